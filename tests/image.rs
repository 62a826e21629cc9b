//! The container image (`deploy/Containerfile`), built by
//! `deploy/build-image.sh` with buildah and run with podman the way a
//! DaemonSet runs it: as uid 65532, with its own CA bundle and an `/etc/hosts`
//! the runtime writes. Needs buildah, podman, runc and skopeo (Debian
//! packages; `.ci/run` installs them) and, for the agent, the lab
//! (`tests/lab/up.sh`).
//!
//! The agent in the image reaches Keystone by a name only `/etc/hosts` knows,
//! over TLS with a certificate from a CA of this test: trusted when the CA is
//! mounted over the image's bundle, refused with the image's own (Debian's)
//! bundle. The Kubernetes API is the in-process server (or
//! `DRAINER_TEST_KUBECONFIG`'s cluster), also reached by a name.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use support::cluster::TestCluster;
use support::openstack::{BootSpec, Lab};
use support::wait::{eventually, free_port};
use tokio::net::TcpListener;
use tokio::sync::OnceCell;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

const ARCHIVE: &str = "target/image/nova-kubernetes-drain.oci.tar";
/// The name `build-image.sh` gives the image, as podman stores it.
const IMAGE: &str = concat!("localhost/nova-kubernetes-drain:", env!("CARGO_PKG_VERSION"));
const KEYSTONE_NAME: &str = "keystone.drainer.test";
const KUBERNETES_NAME: &str = "kubernetes.drainer.test";
const NOVA_HOST: &str = "host1";
const NAMESPACE: &str = "nova-drain";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a tool to completion; panics naming it (and how to get it) if it cannot start.
fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(root())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}): apt-get install buildah podman runc skopeo"))
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `deploy/build-image.sh`: its image digest.
fn build_image() -> String {
    let output = run("bash", &["deploy/build-image.sh"]);
    let said = text(&output);
    assert!(output.status.success(), "deploy/build-image.sh failed:\n{said}");
    said.lines()
        .find_map(|l| l.strip_prefix("digest: "))
        .unwrap_or_else(|| panic!("build-image.sh printed no digest:\n{said}"))
        .to_string()
}

/// The image, built once for this test binary (the first build compiles a
/// release binary: minutes), and loaded into a podman store of its own.
struct Built {
    digest: String,
    podman_store: PathBuf,
}

static BUILT: OnceCell<Built> = OnceCell::const_new();

async fn built() -> &'static Built {
    BUILT
        .get_or_init(async || {
            tokio::task::spawn_blocking(|| {
                let digest = build_image();
                let podman_store = root().join("target/image/podman");
                let built = Built { digest, podman_store };
                let loaded = built.podman(&["load", "--quiet", "--input", ARCHIVE]);
                assert!(loaded.status.success(), "podman load:\n{}", text(&loaded));
                built
            })
            .await
            .expect("build the image")
        })
        .await
}

impl Built {
    /// podman with its own vfs store, configured to run here (no systemd,
    /// hybrid cgroups: runc with explicit ulimits; never a CNI bridge).
    fn podman_args(&self) -> Vec<String> {
        let store = self.podman_store.display();
        vec![
            format!("--root={store}/root"),
            format!("--runroot={store}/run"),
            "--storage-driver=vfs".into(),
            "--cgroup-manager=cgroupfs".into(),
            "--events-backend=file".into(),
        ]
    }

    fn podman(&self, args: &[&str]) -> Output {
        let mut all = self.podman_args();
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        run("podman", &all)
    }

    /// `podman run` of the image as container `container`: host network,
    /// [`KEYSTONE_NAME`] and [`KUBERNETES_NAME`] in its `/etc/hosts`, the
    /// ulimits runc needs here; `options` go to podman, `args` to drainer.
    fn command(&self, container: &Container, options: &[String], args: &[&str]) -> Command {
        let mut command = Command::new("podman");
        command
            .args(self.podman_args())
            .args([
                "run",
                "--rm",
                "--name",
                &container.name,
                "--runtime=runc",
                "--network=host",
            ])
            .args(["--ulimit=nofile=20000:20000", "--ulimit=nproc=8192:8192"])
            .args([KEYSTONE_NAME, KUBERNETES_NAME].map(|host| format!("--add-host={host}:127.0.0.1")))
            .args(options)
            .arg(IMAGE)
            .args(args)
            .stdin(Stdio::null());
        command
    }
}

/// A container of a test, removed (by its name) when dropped.
struct Container {
    name: String,
    podman: Vec<String>,
}

impl Container {
    fn new(built: &Built, what: &str) -> Container {
        Container {
            name: format!("drainer-test-{what}-{}", std::process::id()),
            podman: built.podman_args(),
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(&self.podman)
            .args(["rm", "--force", "--time=0", "--ignore", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A TLS front for the lab's Keystone at `https://KEYSTONE_NAME:PORT/v3`,
/// with a certificate issued by a CA made for this test.
struct TlsKeystone {
    url: String,
    ca_pem: String,
    proxy: tokio::task::JoinHandle<()>,
}

impl TlsKeystone {
    async fn start(keystone: &str) -> TlsKeystone {
        let backend = url::Url::parse(keystone).expect("the lab's Keystone URL");
        let backend = format!(
            "{}:{}",
            backend.host_str().expect("host"),
            backend.port_or_known_default().expect("port")
        );
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "drainer image test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().expect("CA key")).expect("CA");
        let key = rcgen::KeyPair::generate().expect("key");
        let certificate = rcgen::CertificateParams::new(vec![KEYSTONE_NAME.to_string()])
            .expect("params")
            .signed_by(&key, &ca)
            .expect("certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![certificate.der().clone()],
                rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            )
            .expect("TLS config");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let proxy = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (acceptor, backend) = (acceptor.clone(), backend.clone());
                tokio::spawn(async move {
                    let Ok(mut client) = acceptor.accept(client).await else {
                        return;
                    };
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(&backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        TlsKeystone {
            url: format!("https://{KEYSTONE_NAME}:{port}/v3"),
            ca_pem: ca.pem(),
            proxy,
        }
    }
}

impl Drop for TlsKeystone {
    fn drop(&mut self) {
        self.proxy.abort();
    }
}

/// The `config` object of the image (`skopeo inspect --config`).
fn image_config() -> Value {
    let output = run("skopeo", &["inspect", "--config", &format!("oci-archive:{ARCHIVE}")]);
    assert!(output.status.success(), "skopeo inspect:\n{}", text(&output));
    serde_json::from_slice(&output.stdout).expect("skopeo inspect --config: JSON")
}

/// The files of the image's single layer, as `tar -tv` lists them.
fn layer_listing() -> String {
    let dir = tempdir("layer");
    let copied = run(
        "skopeo",
        &[
            "copy",
            "--quiet",
            &format!("oci-archive:{ARCHIVE}"),
            &format!("dir:{}", dir.display()),
        ],
    );
    assert!(copied.status.success(), "skopeo copy:\n{}", text(&copied));
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).expect("manifest.json")).expect("manifest");
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "one layer: {manifest}");
    let digest = layers[0]["digest"].as_str().expect("layer digest");
    let blob = dir.join(digest.trim_start_matches("sha256:"));
    let listing = run("tar", &["-tvzf", &blob.to_string_lossy(), "--numeric-owner"]);
    assert!(listing.status.success(), "tar -tv:\n{}", text(&listing));
    let _ = std::fs::remove_dir_all(&dir);
    String::from_utf8_lossy(&listing.stdout).into_owned()
}

fn tempdir(what: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("drainer-image-{what}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[tokio::test]
async fn the_image_is_the_static_binary_from_scratch_labelled_and_reproducible() {
    let built = built().await;

    let config = image_config();
    let c = &config["config"];
    assert_eq!(c["User"], "65532:65532");
    assert_eq!(c["Entrypoint"], serde_json::json!(["/drainer"]));
    assert!(c["Cmd"].is_null(), "no default arguments: {c}");
    let labels = &c["Labels"];
    assert_eq!(labels["org.opencontainers.image.version"], env!("CARGO_PKG_VERSION"));
    let head = text(&run("git", &["rev-parse", "HEAD"])).trim().to_string();
    let revision = labels["org.opencontainers.image.revision"].as_str().unwrap_or_default();
    assert!(
        revision.trim_end_matches("-dirty") == head,
        "revision {revision} is HEAD {head}"
    );
    let commit_time = text(&run("git", &["log", "-1", "--format=%cI"])).trim().to_string();
    let created: jiff::Timestamp = config["created"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .expect("created is a time");
    let committed: jiff::Timestamp = commit_time.parse().expect("commit time");
    assert_eq!(created, committed, "the image's time is the commit's");
    assert_eq!(labels["org.opencontainers.image.created"], config["created"]);

    let files = layer_listing();
    let entry = |path: &str| {
        files
            .lines()
            .find(|l| l.ends_with(&format!(" {path}")))
            .unwrap_or_else(|| panic!("no {path} in the image:\n{files}"))
            .to_string()
    };
    assert!(entry("drainer").starts_with("-rwxr-xr-x 0/0"), "{}", entry("drainer"));
    assert!(entry("tmp/").starts_with("drwxrwxrwt 0/0"), "{}", entry("tmp/"));
    assert!(entry("etc/passwd").starts_with("-rw-r--r-- 0/0"));
    entry("etc/group");
    entry("etc/ssl/certs/ca-certificates.crt");
    let regular: Vec<&str> = files.lines().filter(|l| l.starts_with('-')).collect();
    assert_eq!(
        regular.len(),
        4,
        "the binary, passwd, group and the CA bundle only:\n{files}"
    );

    // The same commit builds the same image.
    let again = tokio::task::spawn_blocking(build_image).await.expect("rebuild");
    assert_eq!(
        again, built.digest,
        "a second build of the same commit has the same digest"
    );
}

#[tokio::test]
async fn podman_runs_the_image() {
    let built = built().await;
    let container = Container::new(built, "version");
    let version = built
        .command(&container, &[], &["--version"])
        .output()
        .expect("podman run");
    assert!(version.status.success(), "{}", text(&version));
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        concat!("drainer ", env!("CARGO_PKG_VERSION"))
    );
}

/// The uid the container's main process runs as (from `/proc`).
fn container_uid(built: &Built, container: &Container) -> Option<String> {
    let pid = built.podman(&["inspect", "--format", "{{.State.Pid}}", &container.name]);
    let pid = String::from_utf8_lossy(&pid.stdout).trim().to_string();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        .map(str::to_string)
}

#[tokio::test]
async fn the_agent_in_the_image_drains_its_node_through_names_and_the_bundle_it_is_given() {
    let built = built().await;
    let _exclusive = Lab::exclusive().await;
    let lab = Lab::connect().await;
    lab.reset().await;
    let keystone = TlsKeystone::start(lab.keystone_url()).await;
    let cluster = TestCluster::start(NOVA_HOST, NAMESPACE, IMAGE).await;
    let ids = lab.boot(BootSpec::new("img")).await;

    let dir = tempdir("agent");
    let config = lab.drainer_config().replace(lab.keystone_url(), &keystone.url);
    assert!(config.contains(&keystone.url), "{config}");
    std::fs::write(
        dir.join("config.yaml"),
        format!("{config}nova_host: '{{short}}'\nmigration:\n  poll_interval_seconds: 0.2\n"),
    )
    .expect("config");
    let kubeconfig = dir.join("kubeconfig");
    cluster.write_agent_kubeconfig(&kubeconfig).await;
    if !cluster.is_real() {
        let text = std::fs::read_to_string(&kubeconfig).expect("kubeconfig");
        assert!(text.contains("http://127.0.0.1:"), "{text}");
        std::fs::write(
            &kubeconfig,
            text.replace("http://127.0.0.1:", &format!("http://{KUBERNETES_NAME}:")),
        )
        .expect("kubeconfig");
    }
    std::fs::write(dir.join("ca.pem"), &keystone.ca_pem).expect("CA");
    let config_mount = format!("--volume={}:/config:ro", dir.display());

    // The image's own bundle (Debian's) does not trust the test's CA: the
    // agent says so, naming the URL, and changes nothing.
    let refused = Container::new(built, "refused");
    let output = tokio::process::Command::from(built.command(
        &refused,
        std::slice::from_ref(&config_mount),
        &[
            "-config-path",
            "/config/config.yaml",
            "--node",
            cluster.node(),
            "--dry-run",
        ],
    ))
    .output()
    .await
    .expect("podman run");
    let said = text(&output);
    assert_eq!(output.status.code(), Some(2), "{said}");
    assert!(
        said.contains(&format!("TLS failed for {}/auth/tokens", keystone.url)),
        "{said}"
    );
    assert!(said.contains("UnknownIssuer"), "{said}");

    // With the CA mounted over the image's bundle, the agent does its job.
    let agent = Container::new(built, "agent");
    let port = free_port();
    let identity = cluster.agent_identity();
    let mut options = vec![
        config_mount,
        format!(
            "--volume={}:/etc/ssl/certs/ca-certificates.crt:ro",
            dir.join("ca.pem").display()
        ),
    ];
    options.extend(identity.env.iter().map(|(k, v)| format!("--env={k}={v}")));
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "-daemon",
        "-config-path",
        "/config/config.yaml",
        "--kubeconfig",
        "/config/kubeconfig",
        "--node",
        cluster.node(),
        "--namespace",
        NAMESPACE,
        "--listen",
        &listen,
    ];
    args.extend(identity.flags.iter().map(String::as_str));
    let _running = tokio::process::Command::from(built.command(&agent, &options, &args))
        .kill_on_drop(true)
        .spawn()
        .expect("podman run -daemon");
    eventually("the agent in the image ready", Duration::from_secs(60), async || {
        let ready = reqwest::get(format!("http://{listen}/readyz")).await.ok()?;
        ready.status().is_success().then_some(())
    })
    .await;
    assert_eq!(container_uid(built, &agent).as_deref(), Some("65532"));
    cluster.wait_guard_running(Duration::from_secs(20)).await;

    cluster.drain_until_empty(&lab, NOVA_HOST, &[]).await;
    let server = lab.server(&ids[0]).await;
    assert_eq!(server["status"], "ACTIVE");
    lab.assert_disabled_by_drainer(NOVA_HOST).await;

    cluster.uncordon().await;
    eventually(
        "the service enabled after uncordon",
        Duration::from_secs(20),
        async || (lab.service(NOVA_HOST).await["status"] == "enabled").then_some(()),
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn deploy_runs_this_versions_image() {
    let read = |file: &str| -> Value {
        let text = std::fs::read_to_string(root().join("deploy").join(file)).expect(file);
        serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
    };
    let daemonset = read("daemonset.yaml");
    let image = &daemonset["spec"]["template"]["spec"]["containers"][0]["image"];
    assert_eq!(
        image, "nova-kubernetes-drain",
        "the name build-image.sh gives the image"
    );
    let kustomization = read("kustomization.yaml");
    let tags: Vec<&Value> = kustomization["images"]
        .as_array()
        .expect("images")
        .iter()
        .filter(|i| i["name"] == "nova-kubernetes-drain")
        .map(|i| &i["newTag"])
        .collect();
    assert_eq!(
        tags,
        [env!("CARGO_PKG_VERSION")],
        "deploy/kustomization.yaml tags the image with the crate's version"
    );
}
