//! Self-check of tests/support/openstack.rs against the running lab
//! (`tests/lab/up.sh`): boot in two projects, list by host, reset.

mod support;

use support::openstack::{BootSpec, Lab};

#[tokio::test]
async fn boot_list_reset_two_projects() {
    let _g = Lab::exclusive().await;
    let lab = Lab::connect().await;
    lab.reset().await;

    let a = lab.boot(BootSpec::new("ls-admin").project("admin").host("host1")).await;
    let d = lab.boot(BootSpec::new("ls-demo").project("demo").host("host1")).await;
    let on1 = lab.servers_on("host1").await;
    let mut ids: Vec<&str> = on1.iter().map(|s| s["id"].as_str().unwrap()).collect();
    ids.sort();
    let mut want = vec![a[0].as_str(), d[0].as_str()];
    want.sort();
    assert_eq!(ids, want, "servers_on(host1)");
    let projects: std::collections::HashSet<&str> = on1.iter().map(|s| s["tenant_id"].as_str().unwrap()).collect();
    assert_eq!(projects.len(), 2, "servers owned by two projects");

    lab.set_service("host1", false, Some("lab_support self-check")).await;
    let svc = lab.service("host1").await;
    assert_eq!(svc["status"], "disabled");
    assert_eq!(svc["disabled_reason"], "lab_support self-check");

    lab.reset().await;
    assert!(lab.servers_on("host1").await.is_empty(), "reset() deletes every server");
    let svc = lab.service("host1").await;
    assert_eq!(svc["status"], "enabled");
    assert!(svc["disabled_reason"].is_null());
    assert!(
        lab.drainer_config()
            .contains("IdentityEndpoint: http://127.0.0.1:5000/v3")
    );
}
