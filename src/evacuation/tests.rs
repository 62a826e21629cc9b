//! Tests of the evacuation engine against [`FakeCloud`], an in-memory Nova, on
//! tokio's paused clock: the engine's sleeps advance virtual time at once, so
//! every timing below is exact and every test runs in milliseconds.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, sleep};

use super::fake::*;
use super::*;

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn moves_every_vm_in_planned_order_never_more_than_max_parallel_at_once() {
    let cloud = FakeCloud::new();
    cloud.add_vm("a", "ACTIVE", 4096);
    cloud.add_vm("b", "ACTIVE", 1024);
    cloud.add_vm("c", "PAUSED", 2048);
    cloud.add_vm("d", "SHUTOFF", 512);
    cloud.add_vm("e", "ACTIVE", 1024);
    cloud.script("a", &[Script::Complete { after: secs(30) }]);
    cloud.script("b", &[Script::Complete { after: secs(20) }]);
    cloud.script("c", &[Script::Complete { after: secs(10) }]);
    cloud.script("d", &[Script::Complete { after: secs(15) }]);
    cloud.script("e", &[Script::Complete { after: secs(40) }]);
    let settings = Settings {
        max_parallel: 2,
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    let calls = cloud.calls();
    // Live before cold, smallest RAM first, ties by id.
    assert_eq!(calls.starts, ["b", "e", "c", "a", "d"]);
    assert_eq!(calls.max_in_flight, 2);
    assert_eq!(calls.cold_migrate.len(), 1);
    assert_eq!(calls.confirm_resize, ["d"]);

    assert_eq!(calls.disable.len(), 1);
    let service = cloud.service();
    assert!(!service.enabled);
    assert!(
        service
            .disabled_reason
            .as_deref()
            .unwrap()
            .starts_with(DISABLED_REASON_MARKER)
    );
    assert!(report.service_disabled_by_us);
    assert_eq!(report.service_disabled_reason, service.disabled_reason);

    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.exit_code(), 0);
    assert_eq!(report.servers_left_on_host, 0);
    assert_eq!(report.vms.len(), 5);
    for vm in &report.vms {
        assert_eq!(vm.outcome, Outcome::Migrated, "{vm:?}");
        assert!(vm.destination.as_deref().is_some_and(|d| d != SOURCE), "{vm:?}");
        assert_eq!(vm.attempts, 1);
        assert_eq!(vm.destination, cloud.vm(&vm.id).host);
    }
    assert_eq!(vm(&report, "d").action, Action::ColdMigrate);
    let d = cloud.vm("d");
    assert_eq!((d.status.as_str(), d.task_state), ("SHUTOFF", None));
}

/// A RabbitMQ restart loses the scheduler's reply: a minute later Nova's
/// conductor fails the migration and sets the VM to ERROR, though no
/// hypervisor ever touched it. The engine shows that from the instance
/// action, sets the VM back to ACTIVE and tries again.
#[tokio::test(start_paused = true)]
async fn vm_put_in_error_before_reaching_a_hypervisor_is_set_back_to_active_and_moved() {
    let cloud = FakeCloud::new();
    cloud.add_vm("lost-reply", "ACTIVE", 512);
    cloud.script(
        "lost-reply",
        &[
            Script::ConductorError { after: secs(60) },
            Script::Complete { after: secs(5) },
        ],
    );
    let settings = Settings {
        retries: 1,
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    assert_eq!(cloud.calls().reset_to_active, ["lost-reply"]);
    assert_eq!(cloud.calls().live_migrate_times("lost-reply").len(), 2);
    assert_eq!(cloud.migration_statuses("lost-reply"), ["error", "completed"]);
    let moved = vm(&report, "lost-reply");
    assert_eq!(moved.outcome, Outcome::Migrated, "{moved:?}");
    assert_eq!(moved.attempts, 2);
    assert_eq!(cloud.vm("lost-reply").status, "ACTIVE");
    assert_ne!(cloud.vm("lost-reply").host.as_deref(), Some(SOURCE));
    assert_eq!(report.result, RunResult::Succeeded);
}

/// A paused VM that Nova put in ERROR is not set back: `os-resetState` knows
/// only ACTIVE and ERROR, and ACTIVE would misstate a paused guest.
#[tokio::test(start_paused = true)]
async fn paused_vm_put_in_error_is_left_to_an_operator() {
    let cloud = FakeCloud::new();
    cloud.add_vm("paused", "PAUSED", 512);
    cloud.script("paused", &[Script::ConductorError { after: secs(60) }]);
    let settings = Settings {
        retries: 1,
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    assert!(cloud.calls().reset_to_active.is_empty());
    assert_eq!(cloud.calls().live_migrate_times("paused").len(), 1);
    assert_eq!(vm(&report, "paused").outcome, Outcome::Failed);
    assert!(reason(&report, "paused").contains("ERROR"), "{report:?}");
    assert_eq!(report.exit_code(), 1);
}

#[tokio::test(start_paused = true)]
async fn failed_migration_is_retried_with_doubling_backoff_then_reported_failed() {
    let cloud = FakeCloud::new();
    cloud.add_vm("flaky", "ACTIVE", 512);
    cloud.add_vm("fine", "ACTIVE", 1024);
    cloud.script("flaky", &[Script::Fail { after: secs(5) }]);
    let settings = Settings {
        max_parallel: 2,
        retries: 2,
        retry_backoff: secs(10),
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    let starts = cloud.calls().live_migrate_times("flaky");
    assert_eq!(starts.len(), 3, "one attempt and two retries: {starts:?}");
    // Each attempt fails after 5 s; the retry waits 10 s, then 20 s (to within one poll interval).
    assert_within(starts[1] - starts[0], secs(15), secs(15) + millis(500));
    assert_within(starts[2] - starts[1], secs(25), secs(25) + millis(500));

    let flaky = vm(&report, "flaky");
    assert_eq!(flaky.outcome, Outcome::Failed);
    assert_eq!(flaky.attempts, settings.retries + 1);
    assert!(reason(&report, "flaky").contains("3 attempt(s) failed"), "{flaky:?}");
    assert!(reason(&report, "flaky").contains("error"), "{flaky:?}");
    assert_eq!(cloud.vm("flaky").host.as_deref(), Some(SOURCE));

    assert_eq!(vm(&report, "fine").outcome, Outcome::Migrated);
    assert_eq!(report.result, RunResult::Failed);
    assert_eq!(report.exit_code(), 1);
    assert_eq!(report.servers_left_on_host, 1);
}

#[tokio::test(start_paused = true)]
async fn migration_over_budget_is_aborted_and_vm_stays_on_source() {
    let cloud = FakeCloud::new();
    cloud.add_vm("big", "ACTIVE", 8192);
    cloud.script("big", &[Script::Stall { progress_for: secs(10) }]);
    let settings = Settings {
        budget: Budget::Fixed(secs(60)),
        stall_after: None,
        on_budget_exceeded: BudgetAction::Abort,
        retries: 3,
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    let calls = cloud.calls();
    assert_eq!(calls.abort.len(), 1);
    assert_within(calls.abort[0].1, secs(60), secs(61));
    assert!(calls.force_complete.is_empty());
    assert_eq!(calls.live_migrate.len(), 1, "an aborted migration is not retried");

    let big = vm(&report, "big");
    assert_eq!(big.outcome, Outcome::Aborted);
    assert!(reason(&report, "big").contains("budget of 60 s"), "{big:?}");
    let server = cloud.vm("big");
    assert_eq!(server.host.as_deref(), Some(SOURCE));
    assert_eq!((server.status.as_str(), server.task_state), ("ACTIVE", None));
    assert_eq!(cloud.migration_statuses("big"), ["cancelled"]);
    assert_eq!(report.result, RunResult::Failed);
}

#[tokio::test(start_paused = true)]
async fn migration_over_budget_is_force_completed_when_so_configured() {
    let cloud = FakeCloud::new();
    cloud.add_vm("big", "ACTIVE", 8192);
    cloud.script("big", &[Script::Stall { progress_for: secs(10) }]);
    let settings = Settings {
        budget: Budget::Fixed(secs(60)),
        stall_after: None,
        on_budget_exceeded: BudgetAction::ForceComplete,
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    let calls = cloud.calls();
    assert_eq!(calls.force_complete.len(), 1);
    assert_within(calls.force_complete[0].1, secs(60), secs(61));
    assert!(calls.abort.is_empty());
    let big = vm(&report, "big");
    assert_eq!(big.outcome, Outcome::Migrated);
    assert_eq!(big.destination, cloud.vm("big").host);
    assert_ne!(big.destination.as_deref(), Some(SOURCE));
    assert_eq!(report.result, RunResult::Succeeded);
}

#[tokio::test(start_paused = true)]
async fn stalled_migration_is_aborted_before_its_budget() {
    let cloud = FakeCloud::new();
    cloud.add_vm("stuck", "ACTIVE", 4096);
    // Progresses for 20 s, then memory_remaining_bytes stays put.
    cloud.script("stuck", &[Script::Stall { progress_for: secs(20) }]);
    let settings = Settings {
        budget: Budget::Fixed(secs(600)),
        stall_after: Some(secs(30)),
        on_budget_exceeded: BudgetAction::Abort,
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    let aborts = cloud.calls().abort_times("stuck");
    assert_eq!(aborts.len(), 1);
    // Last progress seen at the first reading after 20 s (readings every 2 s), then 30 s without.
    assert_within(aborts[0], secs(50), secs(54));
    assert_eq!(vm(&report, "stuck").outcome, Outcome::Aborted);
    assert!(reason(&report, "stuck").contains("no progress for 30 s"), "{report:?}");
}

#[tokio::test(start_paused = true)]
async fn without_progress_numbers_only_the_budget_applies() {
    let cloud = FakeCloud::new();
    cloud.add_vm("zero", "ACTIVE", 1024);
    cloud.add_vm("null", "ACTIVE", 2048);
    cloud.progress("zero", Progress::Zero);
    cloud.progress("null", Progress::Missing);
    cloud.script(
        "zero",
        &[Script::Stall {
            progress_for: Duration::ZERO,
        }],
    );
    cloud.script(
        "null",
        &[Script::Stall {
            progress_for: Duration::ZERO,
        }],
    );
    let settings = Settings {
        max_parallel: 2,
        budget: Budget::Fixed(secs(120)),
        stall_after: Some(secs(30)),
        on_budget_exceeded: BudgetAction::Abort,
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    for id in ["zero", "null"] {
        let aborts = cloud.calls().abort_times(id);
        assert_eq!(aborts.len(), 1, "{id}");
        assert_within(aborts[0], secs(120), secs(121));
        assert_eq!(vm(&report, id).outcome, Outcome::Aborted);
        assert!(reason(&report, id).contains("budget of 120 s"), "{report:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn migration_whose_remaining_memory_only_oscillates_is_stalled() {
    let cloud = FakeCloud::new();
    cloud.add_vm("busy", "ACTIVE", 4096);
    // The classic non-converging guest: each pre-copy pass brings remaining memory down, the next one starts higher.
    cloud.script("busy", &[Script::Thrash { period: secs(10) }]);
    let settings = Settings {
        budget: Budget::Fixed(secs(600)),
        stall_after: Some(secs(30)),
        on_budget_exceeded: BudgetAction::Abort,
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    let aborts = cloud.calls().abort_times("busy");
    assert_eq!(aborts.len(), 1);
    // The lowest reading is the last of the first pass (8.5 s); none lower in the 30 s after it.
    assert_within(aborts[0], secs(38), secs(41));
    assert!(reason(&report, "busy").contains("no progress"), "{report:?}");
}

#[tokio::test(start_paused = true)]
async fn overall_timeout_aborts_in_flight_and_starts_nothing_new() {
    let cloud = FakeCloud::new();
    cloud.add_vm("quick", "ACTIVE", 512);
    cloud.add_vm("stuck", "ACTIVE", 1024);
    cloud.add_vm("later", "ACTIVE", 2048);
    cloud.script("quick", &[Script::Complete { after: secs(30) }]);
    cloud.script("stuck", &[Script::Stall { progress_for: secs(5) }]);
    let settings = Settings {
        timeout: Some(secs(60)),
        budget: Budget::Fixed(secs(600)),
        stall_after: None,
        on_budget_exceeded: BudgetAction::Abort,
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    let calls = cloud.calls();
    assert_eq!(calls.starts, ["quick", "stuck"]);
    assert!(calls.live_migrate.iter().all(|(_, at)| *at < secs(60)), "{calls:?}");
    assert_eq!(calls.abort.len(), 1);
    assert_within(calls.abort[0].1, secs(60), secs(61));

    assert_eq!(vm(&report, "quick").outcome, Outcome::Migrated);
    assert_eq!(vm(&report, "stuck").outcome, Outcome::Aborted);
    assert!(reason(&report, "stuck").contains("time-out of 60 s"), "{report:?}");
    assert_eq!(cloud.vm("stuck").host.as_deref(), Some(SOURCE));
    assert_eq!(vm(&report, "later").outcome, Outcome::NotStarted);
    assert_eq!(vm(&report, "later").attempts, 0);
    assert_eq!(report.result, RunResult::TimedOut);
    assert_eq!(report.exit_code(), 1);
    assert_eq!(report.servers_left_on_host, 2);
}

#[tokio::test(start_paused = true)]
async fn overall_timeout_force_completes_in_flight_when_so_configured() {
    let cloud = FakeCloud::new();
    cloud.add_vm("stuck", "ACTIVE", 1024);
    cloud.add_vm("later", "ACTIVE", 2048);
    cloud.script("stuck", &[Script::Stall { progress_for: secs(5) }]);
    let settings = Settings {
        timeout: Some(secs(60)),
        budget: Budget::Fixed(secs(600)),
        stall_after: None,
        on_budget_exceeded: BudgetAction::ForceComplete,
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    assert_eq!(cloud.calls().force_complete.len(), 1);
    assert_eq!(vm(&report, "stuck").outcome, Outcome::Migrated);
    assert_eq!(vm(&report, "later").outcome, Outcome::NotStarted);
    assert_eq!(report.result, RunResult::TimedOut);
    assert_eq!(report.servers_left_on_host, 1);
}

#[tokio::test(start_paused = true)]
async fn service_disabled_by_someone_else_is_left_alone_and_never_enabled() {
    let cloud = FakeCloud::new();
    cloud.add_vm("a", "ACTIVE", 512);
    cloud.disable_by_operator("RAM errors, ticket 4711");
    let settings = Settings::default();

    let report = evacuate(&cloud, &settings).await;

    assert!(cloud.calls().disable.is_empty());
    assert!(!report.service_disabled_by_us);
    assert_eq!(
        report.service_disabled_reason.as_deref(),
        Some("RAM errors, ticket 4711")
    );
    assert_eq!(report.result, RunResult::Succeeded, "the VMs are moved all the same");

    let restored = Engine::new(&cloud, &settings, &Quiet)
        .restore(&target(), RestoreOptions::default())
        .await
        .unwrap();
    assert_eq!(
        restored,
        RestoreOutcome::DisabledBySomeoneElse {
            reason: Some("RAM errors, ticket 4711".into())
        }
    );
    assert_eq!(cloud.calls().enable, 0);
    assert!(!cloud.service().enabled);
}

#[tokio::test(start_paused = true)]
async fn restore_enables_only_a_service_we_disabled() {
    let cloud = FakeCloud::new();
    cloud.add_vm("a", "ACTIVE", 512);
    let settings = Settings::default();
    let engine = Engine::new(&cloud, &settings, &Quiet);

    evacuate(&cloud, &settings).await;
    assert!(is_our_reason(cloud.service().disabled_reason.as_deref()));

    let dry_run = RestoreOptions {
        dry_run: true,
        ..RestoreOptions::default()
    };
    assert_eq!(
        engine.restore(&target(), dry_run).await.unwrap(),
        RestoreOutcome::WouldEnable
    );
    assert_eq!(cloud.calls().enable, 0, "a dry run changes nothing");
    assert_eq!(
        engine.restore(&target(), RestoreOptions::default()).await.unwrap(),
        RestoreOutcome::Enabled
    );
    assert_eq!(cloud.calls().enable, 1);
    let service = cloud.service();
    assert!(service.enabled);
    assert_eq!(service.disabled_reason, None);

    assert_eq!(
        engine.restore(&target(), RestoreOptions::default()).await.unwrap(),
        RestoreOutcome::AlreadyEnabled
    );
    assert_eq!(cloud.calls().enable, 1);
}

#[tokio::test(start_paused = true)]
async fn restore_leaves_the_service_disabled_while_servers_move_off_the_host() {
    let cloud = std::sync::Arc::new(FakeCloud::new());
    cloud.add_vm("a", "ACTIVE", 512);
    cloud.script(
        "a",
        &[Script::Stall {
            progress_for: Duration::from_secs(5),
        }],
    );
    let settings = Settings::default();
    let (stop_tx, stop) = watch::channel(StopRequest::Continue);
    let run = tokio::spawn({
        let cloud = cloud.clone();
        async move {
            Engine::new(&*cloud, &Settings::default(), &Quiet)
                .evacuate(&target(), stop)
                .await
        }
    });
    while cloud.migration_statuses("a") != ["running"] {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let engine = Engine::new(&*cloud, &settings, &Quiet);
    assert_eq!(
        engine.restore(&target(), RestoreOptions::default()).await.unwrap(),
        RestoreOutcome::StillMoving {
            servers: vec!["vm-a (a)".into()]
        }
    );
    assert!(!cloud.service().enabled, "an evacuation runs: left disabled");
    let reason = cloud.service().disabled_reason.unwrap_or_default();
    assert!(reason.contains("node node-a by agent drainer-test since"), "{reason}");
    let forced = RestoreOptions {
        even_while_moving: true,
        ..RestoreOptions::default()
    };
    assert_eq!(
        engine.restore(&target(), forced).await.unwrap(),
        RestoreOutcome::Enabled
    );
    let _ = stop_tx.send(StopRequest::AbortInFlight);
    let _ = run.await;
}

#[tokio::test(start_paused = true)]
async fn vm_already_migrating_is_followed_not_migrated_again() {
    let cloud = FakeCloud::new();
    cloud.add_vm("moving", "ACTIVE", 2048);
    cloud.script("moving", &[Script::Complete { after: secs(20) }]);
    cloud.live_migrate_by_operator("moving");
    assert_eq!(cloud.vm("moving").task_state.as_deref(), Some("migrating"));

    let report = evacuate(&cloud, &Settings::default()).await;

    assert!(cloud.calls().live_migrate.is_empty());
    let moving = vm(&report, "moving");
    assert_eq!(moving.outcome, Outcome::Migrated);
    assert_eq!(moving.destination, cloud.vm("moving").host);
    assert_eq!(moving.attempts, 1);
    assert_eq!(report.result, RunResult::Succeeded);
}

#[tokio::test(start_paused = true)]
async fn migration_whose_destination_never_takes_over_is_reported_not_waited_for() {
    let cloud = FakeCloud::new();
    cloud.add_vm("orphan", "ACTIVE", 1024);
    cloud.add_vm("fine", "ACTIVE", 2048);
    cloud.script("orphan", &[Script::DestinationLost { after: secs(10) }]);
    cloud.script("fine", &[Script::Complete { after: secs(10) }]);

    let report = evacuate(&cloud, &Settings::default()).await;

    let orphan = vm(&report, "orphan");
    assert_eq!(orphan.outcome, Outcome::Failed);
    let reason = orphan.reason.as_deref().unwrap_or_default();
    assert!(reason.contains("never took it over"), "{reason}");
    // Found once Nova has listed nothing in progress for 30 s and the record
    // has shown its end for 30 s more, not after the 150 s budget or the 30 min time-out.
    assert!(orphan.duration_seconds < 80.0, "{orphan:?}");
    assert!(
        cloud.calls().abort.is_empty(),
        "nothing to abort: Nova says it completed"
    );
    assert_eq!(
        cloud.calls().live_migrate_times("orphan").len(),
        1,
        "never started twice"
    );
    assert_eq!(vm(&report, "fine").outcome, Outcome::Migrated, "the others still move");
    assert_eq!(report.result, RunResult::Failed);
}

#[tokio::test(start_paused = true)]
async fn an_agent_disables_first_even_when_the_capacity_check_then_fails() {
    let cloud = FakeCloud::new();
    cloud.add_vm("huge", "ACTIVE", 16384);
    cloud.other_hosts(&[("cmp-dst-1", 8192)]);
    let settings = Settings {
        disable_first: true,
        ..Settings::default()
    };
    let (_never_stop, stop) = watch::channel(StopRequest::Continue);

    let result = Engine::new(&cloud, &settings, &Quiet).evacuate(&target(), stop).await;

    assert!(matches!(result, Err(EvacuationError::Capacity(_))), "{result:?}");
    assert!(!cloud.service().enabled, "no new VM may land once the node is cordoned");
    assert!(is_our_reason(cloud.service().disabled_reason.as_deref()));
    assert!(cloud.calls().starts.is_empty());
}

#[tokio::test(start_paused = true)]
async fn capacity_shortfall_refuses_to_start_and_changes_nothing() {
    let cloud = FakeCloud::new();
    cloud.add_vm("small", "ACTIVE", 512);
    cloud.add_vm("huge", "ACTIVE", 16384);
    cloud.add_vm("broken", "ERROR", 65536); // skipped, so not counted
    cloud.other_hosts(&[("cmp-dst-1", 8192)]);
    let settings = Settings::default();
    let (_never_stop, stop) = watch::channel(StopRequest::Continue);

    let result = Engine::new(&cloud, &settings, &Quiet).evacuate(&target(), stop).await;

    let Err(EvacuationError::Capacity(shortfall)) = result else {
        panic!("expected a capacity error, got {result:?}");
    };
    let unplaced: Vec<&str> = shortfall.unplaced.iter().map(|s| s.needs.id.as_str()).collect();
    assert_eq!(unplaced, ["huge"]);
    assert_eq!(shortfall.hosts, 1);
    let calls = cloud.calls();
    assert!(calls.disable.is_empty());
    assert!(calls.starts.is_empty());
    assert!(cloud.service().enabled);
}

/// Two hosts evacuated at once share the destinations: what is still on the
/// other one is placed first, and a run that would only fit without it is
/// refused with that reason instead of failing migrations.
#[tokio::test(start_paused = true)]
async fn what_still_leaves_a_host_evacuated_elsewhere_is_spoken_for() {
    let cloud = FakeCloud::new();
    cloud.add_vm("ours", "ACTIVE", 2048);
    cloud.other_hosts(&[("cmp-dst-1", 4096)]);
    cloud.evacuated_elsewhere("cmp-other", &[("theirs-1", 1024), ("theirs-2", 2048)]);
    let (_never_stop, stop) = watch::channel(StopRequest::Continue);
    let settings = Settings {
        evacuating_elsewhere: vec!["cmp-other".into()],
        ..Settings::default()
    };
    let result = Engine::new(&cloud, &settings, &Quiet).evacuate(&target(), stop).await;
    let Err(EvacuationError::Capacity(shortfall)) = result else {
        panic!("expected a capacity error, got {result:?}");
    };
    assert_eq!(shortfall.spoken_for, ["cmp-other"]);
    let message = EvacuationError::Capacity(shortfall).to_string();
    assert!(
        message.contains("once what still has to leave cmp-other (evacuated at the same time) is placed"),
        "{message}"
    );
    assert!(cloud.calls().starts.is_empty());

    // With the other host's VMs gone, it fits.
    cloud.evacuated_elsewhere("cmp-other", &[]);
    let (_never_stop, stop) = watch::channel(StopRequest::Continue);
    let report = Engine::new(&cloud, &settings, &Quiet)
        .evacuate(&target(), stop)
        .await
        .expect("it fits");
    assert_eq!(report.result, RunResult::Succeeded);
}

#[tokio::test(start_paused = true)]
async fn capacity_look_up_failure_stops_an_evacuation_only_when_something_must_move() {
    let cloud = FakeCloud::new();
    cloud.add_vm("broken", "ERROR", 512); // skipped by the state policy: nothing to place
    cloud.placement_down();

    let report = evacuate(&cloud, &Settings::default()).await;
    assert_eq!(vm(&report, "broken").outcome, Outcome::Skipped);
    assert!(!cloud.service().enabled);

    cloud.add_vm("a", "ACTIVE", 512);
    let (_never_stop, stop) = watch::channel(StopRequest::Continue);
    let result = Engine::new(&cloud, &Settings::default(), &Quiet)
        .evacuate(&target(), stop)
        .await;
    assert!(
        matches!(&result, Err(EvacuationError::Compute { step, .. }) if step.contains("capacity")),
        "{result:?}"
    );
    assert!(cloud.calls().starts.is_empty());
}

/// A run-once lists the host, checks capacity, then disables the service:
/// a VM that lands in between (someone else's migration) is found by the
/// listing made after the disable, while the checked VMs already move, and
/// is moved too. The checked VM starts first although the newcomer is
/// smaller: the first migration does not wait for the second listing.
#[tokio::test(start_paused = true)]
async fn a_vm_landing_before_the_disable_is_moved_too() {
    let cloud = FakeCloud::new();
    cloud.add_vm("checked", "ACTIVE", 512);
    cloud.add_vm("late", "ACTIVE", 256);
    cloud.lock().vms.get_mut("late").expect("late").server.host = Some("cmp-elsewhere".into());
    cloud.after_next_listing(|cloud| {
        cloud.vms.get_mut("late").expect("late").server.host = Some(SOURCE.into());
    });

    let report = evacuate(&cloud, &Settings::default()).await;

    assert_eq!(report.result, RunResult::Succeeded, "{report:?}");
    assert_eq!(vm(&report, "late").outcome, Outcome::Migrated);
    assert_eq!(cloud.calls().starts, ["checked", "late"]);
    assert_ne!(cloud.vm("late").host.as_deref(), Some(SOURCE));
}

#[tokio::test(start_paused = true)]
async fn a_listing_overtaken_by_someone_else_is_read_again_not_counted_as_a_failure() {
    let cloud = FakeCloud::new();
    cloud.add_vm("deleted", "ACTIVE", 512);
    cloud.add_vm("moved-by-operator", "ACTIVE", 1024);
    cloud.add_vm("plain", "ACTIVE", 2048);
    cloud.script("moved-by-operator", &[Script::Complete { after: secs(20) }]);
    // Between the listing and the engine's first requests: a user deletes one VM, an operator starts moving another.
    cloud.after_next_listing(|cloud| {
        cloud.vms.remove("deleted");
        cloud
            .start_migration("moved-by-operator", LIVE, Instant::now(), None)
            .expect("operator's migration starts");
    });
    let settings = Settings {
        max_parallel: 3,
        disable_first: true,
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    assert_eq!(report.result, RunResult::Succeeded, "{report:?}");
    assert_eq!(vm(&report, "deleted").outcome, Outcome::Deleted);
    let followed = vm(&report, "moved-by-operator");
    assert_eq!((&followed.outcome, followed.attempts), (&Outcome::Migrated, 1));
    assert_eq!(cloud.migration_statuses("moved-by-operator"), ["completed"]);
    assert_eq!(vm(&report, "plain").attempts, 1);
    // The first requests went out on the listing's word, with no read of each server in between.
    assert_eq!(cloud.calls().starts, ["deleted", "moved-by-operator", "plain"]);
}

#[tokio::test(start_paused = true)]
async fn only_enabled_and_up_hosts_count_as_room() {
    let cloud = FakeCloud::new();
    cloud.add_vm("big", "ACTIVE", 16384);
    cloud.other_hosts(&[("cmp-disabled", 65536), ("cmp-down", 65536), ("cmp-small", 8192)]);
    cloud.other_service("cmp-disabled", false, true);
    cloud.other_service("cmp-down", true, false);
    let (_never_stop, stop) = watch::channel(StopRequest::Continue);

    let result = Engine::new(&cloud, &Settings::default(), &Quiet)
        .evacuate(&target(), stop)
        .await;

    let Err(EvacuationError::Capacity(shortfall)) = result else {
        panic!("expected a capacity error, got {result:?}");
    };
    assert_eq!(shortfall.hosts, 1, "only cmp-small can take VMs");
    assert!(cloud.service().enabled);
}

#[tokio::test(start_paused = true)]
async fn a_dry_run_shows_the_capacity_verdict_and_changes_nothing() {
    let cloud = FakeCloud::new();
    cloud.add_vm("small", "ACTIVE", 512);
    cloud.add_vm("huge", "ACTIVE", 16384);
    cloud.other_hosts(&[("cmp-dst-1", 8192)]);
    let preview = async |settings: &Settings| {
        Engine::new(&cloud, settings, &Quiet)
            .preview(&target())
            .await
            .expect("preview")
    };

    let report = preview(&Settings::default()).await;
    let capacity = report.capacity.clone().expect("checked");
    assert_eq!(capacity.unplaced, ["huge"]);
    assert_eq!(capacity.candidates.len(), 1);
    assert_eq!(capacity.candidates[0].host, "cmp-dst-1");
    assert_eq!(report.exit_code(), 1, "a run would stop on the shortfall");
    assert!(
        report
            .to_human(&View::default())
            .contains("SHORTFALL: 1 of the 2 VM(s)"),
        "{}",
        report.to_human(&View::default())
    );

    cloud.other_hosts(&[("cmp-dst-2", 32768)]);
    let report = preview(&Settings::default()).await;
    assert_eq!(report.capacity.as_ref().map(|c| c.unplaced.len()), Some(0));
    assert_eq!(report.exit_code(), 0);

    let skipped = Settings {
        check_capacity: false,
        ..Settings::default()
    };
    assert_eq!(preview(&skipped).await.capacity, None);
    let calls = cloud.calls();
    assert!(calls.disable.is_empty() && calls.starts.is_empty());
    assert!(cloud.service().enabled);
}

/// A SUSPENDED VM cannot be moved: the real run ends FAILED with exit 1,
/// and the dry run says so and exits 1 too, instead of promising success.
#[tokio::test(start_paused = true)]
async fn a_dry_run_exits_as_the_run_it_plans_would_end() {
    let cloud = FakeCloud::new();
    cloud.add_vm("up", "ACTIVE", 512);
    cloud.add_vm("off", "SHUTOFF", 512);
    cloud.add_vm("asleep", "SUSPENDED", 512);

    let dry = Engine::new(&cloud, &Settings::default(), &Quiet)
        .preview(&target())
        .await
        .expect("preview");

    let prediction = dry.prediction.clone().expect("a dry run forecasts");
    assert!(prediction.disables_service);
    assert_eq!((prediction.live_migrations, prediction.cold_migrations), (1, 1));
    assert_eq!(prediction.stays, ["asleep"]);
    assert_eq!(prediction.result, RunResult::Failed);
    let human = dry.to_human(&View::default());
    assert!(human.contains(&format!("disable nova-compute on {SOURCE}")), "{human}");
    assert!(human.contains("this dry run exits 1"), "{human}");
    let json = serde_json::to_value(&dry).expect("json");
    assert_eq!(json["prediction"]["exit_code"], 1, "{json:#}");
    assert_eq!(json["prediction"]["stays"][0], "asleep", "{json:#}");
    assert!(cloud.calls().disable.is_empty() && cloud.service().enabled);

    let real = evacuate(&cloud, &Settings::default()).await;
    assert_eq!(real.result, RunResult::Failed);
    assert_eq!(dry.exit_code(), real.exit_code());
    assert_eq!(real.exit_code(), 1);
    assert_eq!(real.prediction, None);

    // Once the VM can move, both exit 0; the service is disabled already (by that run).
    cloud.lock().vms.get_mut("asleep").expect("asleep").server.status = "ACTIVE".into();
    let dry = Engine::new(&cloud, &Settings::default(), &Quiet)
        .preview(&target())
        .await
        .expect("preview");
    let prediction = dry.prediction.clone().expect("a dry run forecasts");
    assert!(!prediction.disables_service, "ours already");
    assert_eq!((prediction.result, dry.exit_code()), (RunResult::Succeeded, 0));
    let real = evacuate(&cloud, &Settings::default()).await;
    assert_eq!(real.exit_code(), dry.exit_code());
}

/// Remembers the progress the engine tells.
#[derive(Default)]
struct ProgressSeen(std::sync::Mutex<Vec<[usize; 5]>>);

impl ProgressSeen {
    fn all(&self) -> Vec<[usize; 5]> {
        self.0.lock().expect("not poisoned").clone()
    }
}

impl Observer for ProgressSeen {
    fn event(&self, event: &Event<'_>) {
        if let Event::Progress {
            total,
            moved,
            not_moved,
            running,
            queued_in_nova,
        } = event
        {
            let seen = [*total, *moved, *not_moved, *running, *queued_in_nova];
            self.0.lock().expect("not poisoned").push(seen);
        }
    }
}

/// With `max_parallel: 1` and one migration handed ahead, Nova runs one
/// and holds one queued: the progress says so, never "2 migrating".
#[tokio::test(start_paused = true)]
async fn progress_tells_the_migration_nova_runs_from_the_one_it_holds_queued() {
    let cloud = four_on_a_queueing_nova();
    let seen = ProgressSeen::default();
    let (_never_stop, stop) = watch::channel(StopRequest::Continue);

    let report = Engine::new(&cloud, &Settings::default(), &seen)
        .evacuate(&target(), stop)
        .await
        .expect("the evacuation runs");

    assert_eq!(report.result, RunResult::Succeeded);
    let seen = seen.all();
    assert!(seen.iter().all(|[.., running, _]| *running <= 1), "{seen:?}");
    assert!(seen.contains(&[4, 0, 0, 1, 1]), "{seen:?}");
    assert_eq!(seen.last(), Some(&[4, 4, 0, 0, 0]));
}

/// A time-out ends the run with VMs left: the last progress counts them as
/// not moved (it used to show every VM done).
#[tokio::test(start_paused = true)]
async fn progress_after_a_time_out_counts_what_did_not_move() {
    let cloud = FakeCloud::new();
    cloud.add_vm("quick", "ACTIVE", 512);
    cloud.add_vm("stuck", "ACTIVE", 1024);
    cloud.add_vm("later", "ACTIVE", 2048);
    cloud.script("quick", &[Script::Complete { after: secs(30) }]);
    cloud.script("stuck", &[Script::Stall { progress_for: secs(5) }]);
    let settings = Settings {
        timeout: Some(secs(60)),
        budget: Budget::Fixed(secs(600)),
        stall_after: None,
        on_budget_exceeded: BudgetAction::Abort,
        ..Settings::default()
    };
    let seen = ProgressSeen::default();
    let (_never_stop, stop) = watch::channel(StopRequest::Continue);

    let report = Engine::new(&cloud, &settings, &seen)
        .evacuate(&target(), stop)
        .await
        .expect("the evacuation runs");

    assert_eq!(report.result, RunResult::TimedOut);
    assert_eq!(
        seen.all().last(),
        Some(&[3, 1, 2, 0, 0]),
        "1 moved, stuck aborted, later never started"
    );
}

fn classes(pairs: &[(&str, u64)]) -> Resources {
    pairs
        .iter()
        .map(|(class, amount)| (class.to_string(), *amount))
        .collect()
}

/// Destinations on shared storage report no `DISK_GB`: a volume-backed VM
/// (no `DISK_GB` in its allocation) moves, one with a local disk does not,
/// until a sharing provider offers `DISK_GB` to the destinations.
#[tokio::test(start_paused = true)]
async fn capacity_is_weighed_by_placement_allocations_class_by_class() {
    let cloud = FakeCloud::new();
    cloud.add_vm("volume", "ACTIVE", 512);
    cloud.add_vm("local", "ACTIVE", 1024);
    cloud.add_vm("unknown", "ACTIVE", 256);
    {
        let mut state = cloud.lock();
        state
            .allocations
            .insert("volume".into(), classes(&[("MEMORY_MB", 512), ("VCPU", 2)]));
        state.allocations.insert(
            "local".into(),
            classes(&[("MEMORY_MB", 1024), ("VCPU", 2), ("DISK_GB", 20)]),
        );
        for host in &mut state.other_hosts {
            host.free.remove("DISK_GB");
        }
    }
    let preview = async || {
        Engine::new(&cloud, &Settings::default(), &Quiet)
            .preview(&target())
            .await
            .expect("preview")
    };

    let report = preview().await;
    let capacity = report.capacity.clone().expect("checked");
    // `unknown` has no allocation: its flavor (20 GiB disk) stands in, and is refused too.
    assert_eq!(capacity.unplaced, ["local", "unknown"]);
    assert_eq!(
        capacity.unplaced_reasons["local"],
        "needs 20 DISK_GB, which no candidate holds"
    );
    let from: Vec<(&str, plan::NeedsFrom)> = capacity.needs.iter().map(|n| (n.id.as_str(), n.from)).collect();
    assert!(from.contains(&("volume", plan::NeedsFrom::Placement)), "{from:?}");
    assert!(from.contains(&("unknown", plan::NeedsFrom::Flavor)), "{from:?}");
    let disk = capacity
        .classes
        .iter()
        .find(|c| c.class == "DISK_GB")
        .expect("DISK_GB balance");
    assert_eq!((disk.needed, disk.free), (40, 0));
    let human = report.to_human(&View::default());
    assert!(human.contains("SHORTFALL: 2 of the 3 VM(s)"), "{human}");
    assert!(
        human.contains("local does not fit: needs 20 DISK_GB, which no candidate holds"),
        "{human}"
    );
    assert!(
        human.contains("needs read from the flavor (Placement shows no allocation on this host): unknown"),
        "{human}"
    );

    // A sharing provider of their aggregate offers DISK_GB: one pool of 30 GiB for both hosts.
    {
        let mut state = cloud.lock();
        state.shared.insert("ceph".into(), classes(&[("DISK_GB", 30)]));
        for host in &mut state.other_hosts {
            host.shared.insert("DISK_GB".into(), "ceph".into());
        }
    }
    let capacity = preview().await.capacity.expect("checked");
    assert_eq!(
        capacity.unplaced,
        ["unknown"],
        "20 GiB of 30 left 10 for a 20 GiB flavor"
    );
    let disk = capacity
        .classes
        .iter()
        .find(|c| c.class == "DISK_GB")
        .expect("DISK_GB balance");
    assert_eq!(
        (disk.needed, disk.free),
        (40, 30),
        "the pool counted once, not per host"
    );

    cloud
        .lock()
        .allocations
        .insert("unknown".into(), classes(&[("MEMORY_MB", 256), ("VCPU", 1)]));
    let report = evacuate(&cloud, &Settings::default()).await;
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(cloud.calls().starts.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_class_no_destination_holds_refuses_the_run_and_names_the_class() {
    let cloud = FakeCloud::new();
    cloud.add_vm("pinned", "ACTIVE", 512);
    cloud
        .lock()
        .allocations
        .insert("pinned".into(), classes(&[("MEMORY_MB", 512), ("PCPU", 4)]));
    let (_never_stop, stop) = watch::channel(StopRequest::Continue);

    let result = Engine::new(&cloud, &Settings::default(), &Quiet)
        .evacuate(&target(), stop)
        .await;

    let Err(error @ EvacuationError::Capacity(_)) = result else {
        panic!("expected a capacity error, got {result:?}");
    };
    assert!(
        error
            .to_string()
            .contains("pinned (needs 4 PCPU, which no candidate holds)"),
        "{error}"
    );
    assert!(cloud.calls().disable.is_empty() && cloud.calls().starts.is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_report_names_projects_and_keeps_the_id_of_one_keystone_cannot_name() {
    let cloud = FakeCloud::new();
    cloud.add_vm("named", "ACTIVE", 512);
    cloud.add_vm("orphan", "SUSPENDED", 512);
    cloud.lock().vms.get_mut("orphan").expect("orphan").server.project_id = "deleted-project".into();

    let report = evacuate(&cloud, &Settings::default()).await;

    let named = vm(&report, "named");
    assert_eq!(
        (named.project.as_deref(), named.project_id.as_str()),
        (Some("demo"), "tenant-1")
    );
    let orphan = vm(&report, "orphan");
    assert_eq!(
        (orphan.project.as_deref(), orphan.project_id.as_str()),
        (None, "deleted-project")
    );
    let table = report.to_human(&View::default());
    assert!(
        table.contains("  demo  ") && table.contains("  deleted-project  "),
        "{table}"
    );
}

#[tokio::test(start_paused = true)]
async fn capacity_check_can_be_skipped() {
    let cloud = FakeCloud::new();
    cloud.add_vm("huge", "ACTIVE", 16384);
    cloud.other_hosts(&[("cmp-dst-1", 8192)]);
    let settings = Settings {
        check_capacity: false,
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    // The fake scheduler ignores capacity; the point is that the engine tried.
    assert_eq!(cloud.calls().starts, ["huge"]);
    assert_eq!(report.result, RunResult::Succeeded);
}

#[tokio::test(start_paused = true)]
async fn stop_leave_in_flight_returns_at_once_and_leaves_the_migration_to_nova() {
    let cloud = FakeCloud::new();
    cloud.add_vm("long", "ACTIVE", 512);
    cloud.add_vm("next", "ACTIVE", 1024);
    cloud.script("long", &[Script::Complete { after: secs(100) }]);

    let report = evacuate_stopped(&cloud, &Settings::default(), secs(10), StopRequest::LeaveInFlight).await;

    assert!(
        report.duration_seconds < 10.5,
        "returned after {} s",
        report.duration_seconds
    );
    assert_eq!(vm(&report, "long").outcome, Outcome::InProgress);
    assert_eq!(vm(&report, "next").outcome, Outcome::NotStarted);
    assert_eq!(report.result, RunResult::Interrupted);
    assert_eq!(report.exit_code(), 130, "as shells report Ctrl-C");
    // Named while they moved, so the report cut short names them too.
    for id in ["long", "next"] {
        assert_eq!(vm(&report, id).project.as_deref(), Some("demo"), "{report:?}");
    }
    let calls = cloud.calls();
    assert!(calls.abort.is_empty());
    assert_eq!(calls.starts, ["long"]);
    assert_eq!(
        cloud.vm("long").task_state.as_deref(),
        Some("migrating"),
        "still moving"
    );
}

#[tokio::test(start_paused = true)]
async fn stop_abort_in_flight_aborts_the_live_migration() {
    let cloud = FakeCloud::new();
    cloud.add_vm("long", "ACTIVE", 512);
    cloud.add_vm("next", "ACTIVE", 1024);
    cloud.script("long", &[Script::Complete { after: secs(100) }]);

    let report = evacuate_stopped(&cloud, &Settings::default(), secs(10), StopRequest::AbortInFlight).await;

    let aborts = cloud.calls().abort_times("long");
    assert_eq!(aborts.len(), 1);
    assert_within(aborts[0], secs(10), secs(11));
    assert!(
        report.duration_seconds < 15.0,
        "returned after {} s",
        report.duration_seconds
    );
    assert_eq!(vm(&report, "long").outcome, Outcome::Aborted);
    assert!(reason(&report, "long").contains("cancelled"), "{report:?}");
    assert_eq!(vm(&report, "next").outcome, Outcome::NotStarted);
    assert_eq!(report.result, RunResult::Interrupted);
    let long = cloud.vm("long");
    assert_eq!((long.host.as_deref(), long.task_state), (Some(SOURCE), None));
}

/// Two VMs whose migrations take 200 s; every read of `stuck` takes 90 s
/// (a call's time-outs and retries).
fn long_and_stuck() -> FakeCloud {
    let cloud = FakeCloud::new();
    cloud.add_vm("stuck", "ACTIVE", 512);
    cloud.add_vm("long", "ACTIVE", 512);
    for id in ["stuck", "long"] {
        cloud.script(id, &[Script::Complete { after: secs(200) }]);
    }
    cloud.server_reads_take("stuck", secs(90));
    cloud
}

/// A read of one VM stuck in Nova (90 s: a call's time-outs and retries)
/// does not hold back the cancellation of the others: they are aborted as
/// soon as it is asked for.
#[tokio::test(start_paused = true)]
async fn a_stuck_read_does_not_delay_the_abort_of_the_others() {
    let cloud = long_and_stuck();
    let settings = Settings {
        max_parallel: 2,
        ..Settings::default()
    };

    let report = evacuate_stopped(&cloud, &settings, secs(10), StopRequest::AbortInFlight).await;

    let aborts = cloud.calls().abort_times("long");
    assert!(!aborts.is_empty(), "{report:?}");
    assert_within(aborts[0], secs(10), secs(11));
    assert_within(cloud.calls().abort_times("stuck")[0], secs(10), secs(11));
    assert_eq!(vm(&report, "long").outcome, Outcome::Aborted);
    assert_eq!(report.result, RunResult::Interrupted);
}

/// A read before a VM's start stuck in Nova (90 s) does not hold back the
/// cancellation of a migration already running: it is aborted as soon as it
/// is asked for, and the VM whose read was stuck is reported not started.
#[tokio::test(start_paused = true)]
async fn a_stuck_read_before_a_start_does_not_delay_a_cancellation() {
    let cloud = FakeCloud::new();
    // Smallest first: quick and long start from the listing; late, once quick
    // has moved, from a read of its own, which sticks.
    cloud.add_vm("quick", "ACTIVE", 256);
    cloud.add_vm("long", "ACTIVE", 512);
    cloud.add_vm("late", "ACTIVE", 1024);
    cloud.script("quick", &[Script::Complete { after: secs(5) }]);
    cloud.script("long", &[Script::Complete { after: secs(200) }]);
    cloud.server_reads_take("late", secs(90));
    let settings = Settings {
        max_parallel: 2,
        ..Settings::default()
    };

    let report = evacuate_stopped(&cloud, &settings, secs(10), StopRequest::AbortInFlight).await;

    let aborts = cloud.calls().abort_times("long");
    assert!(!aborts.is_empty(), "{report:?}");
    assert_within(aborts[0], secs(10), secs(11));
    assert_eq!(vm(&report, "quick").outcome, Outcome::Migrated);
    assert_eq!(vm(&report, "long").outcome, Outcome::Aborted);
    assert_eq!(vm(&report, "late").outcome, Outcome::NotStarted);
    assert!(cloud.calls().live_migrate_times("late").is_empty());
    assert!(report.duration_seconds < 15.0, "{}", report.duration_seconds);
}

/// A read of one VM stuck in Nova does not hold back another's budget: it is
/// aborted when its budget runs out, not when the stuck read returns.
#[tokio::test(start_paused = true)]
async fn a_stuck_read_does_not_delay_another_flights_budget() {
    let cloud = long_and_stuck();
    let settings = Settings {
        max_parallel: 2,
        retries: 0,
        budget: Budget::Fixed(secs(20)),
        stall_after: None,
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    let aborts = cloud.calls().abort_times("long");
    assert!(!aborts.is_empty(), "{report:?}");
    assert_within(aborts[0], secs(20), secs(22));
    assert_eq!(vm(&report, "long").outcome, Outcome::Aborted);
}

/// Live migrations of 10.2 s: ends fall between two polls.
const TEN_S: Duration = Duration::from_millis(10_200);

/// Four VMs of [`TEN_S`] each on a Nova that runs one live migration per
/// host and queues the rest, and takes a second to schedule each.
fn four_on_a_queueing_nova() -> FakeCloud {
    let cloud = FakeCloud::new();
    for id in ["a", "b", "c", "d"] {
        cloud.add_vm(id, "ACTIVE", 512);
        cloud.script(id, &[Script::Complete { after: TEN_S }]);
    }
    cloud.nova_queues_beyond(Some(1));
    cloud.nova_schedules_for(secs(1));
    cloud
}

#[tokio::test(start_paused = true)]
async fn nova_holds_the_next_migration_queued_and_starts_it_as_the_last_ends() {
    let cloud = four_on_a_queueing_nova();

    let report = evacuate(&cloud, &Settings::default()).await;

    assert_eq!(report.result, RunResult::Succeeded, "{report:?}");
    let calls = cloud.calls();
    assert_eq!(calls.max_in_flight, 1, "max_parallel bounds what runs");
    assert_eq!(calls.max_queued, 1, "one handed ahead");
    // Each starts in Nova the moment the one before ends: no gap for our
    // poll, our request or Nova's scheduling.
    for (before, next) in [("a", "b"), ("b", "c"), ("c", "d")] {
        assert_eq!(cloud.running_since(next), [cloud.running_since(before)[0] + TEN_S]);
    }
    assert!(calls.live_migrate_times("b")[0] < secs(1), "b handed ahead at once");
    // The first scheduling, four migrations back to back, then the last end seen within half a poll.
    assert!(
        report.duration_seconds <= 1.0 + 40.8 + 0.25,
        "{}",
        report.duration_seconds
    );

    // Without handing ahead, every VM waits for our poll, our request and Nova's scheduling.
    let serial = four_on_a_queueing_nova();
    let settings = Settings {
        queue_ahead: 0,
        ..Settings::default()
    };
    let slower = evacuate(&serial, &settings).await;
    assert_eq!(serial.calls().max_queued, 0);
    assert!(
        slower.duration_seconds >= report.duration_seconds + 3.0,
        "{} s against {} s",
        slower.duration_seconds,
        report.duration_seconds
    );
}

/// Each tick is one look at the servers still on the host and one at the
/// changed migration records, however many migrations are in flight; a
/// server is read once to start it (none for those the fresh listing
/// covers) and once when it has left the host. Every end is seen within a
/// tick, with one migration in flight or three.
#[tokio::test(start_paused = true)]
async fn a_tick_costs_two_looks_whatever_is_in_flight_and_sees_every_end_within_it() {
    for max_parallel in [1, 3] {
        let cloud = FakeCloud::new();
        for i in 0..9 {
            let id = format!("vm{i}");
            cloud.add_vm(&id, "ACTIVE", 512);
            cloud.script(&id, &[Script::Complete { after: TEN_S }]);
        }
        cloud.nova_queues_beyond(Some(max_parallel));
        cloud.nova_schedules_for(secs(1));
        let settings = Settings {
            max_parallel,
            ..Settings::default()
        };

        let report = evacuate(&cloud, &settings).await;

        assert_eq!(report.result, RunResult::Succeeded, "{report:?}");
        let calls = cloud.calls();
        assert_eq!(calls.max_in_flight, max_parallel);
        assert_eq!(calls.max_queued, 1);
        let ticks = (report.duration_seconds / 0.5).ceil() as usize + 1;
        assert!(
            calls.host_looks <= ticks,
            "{} host looks in {ticks} ticks",
            calls.host_looks
        );
        assert!(
            calls.change_reads <= ticks,
            "{} record looks in {ticks} ticks",
            calls.change_reads
        );
        // The default stall check (150 s) reads progress every 15 s: never, for 10 s moves.
        assert_eq!(calls.progress_reads, 0);
        for i in 0..9 {
            let id = format!("vm{i}");
            let server_reads = calls.server_reads.iter().filter(|r| **r == id).count();
            assert!(
                server_reads <= 2,
                "{id}: {server_reads} reads at max_parallel {max_parallel}"
            );
            let ended = cloud.running_since(&id)[0] + TEN_S;
            let seen = calls.live_migrate_times(&id)[0] + Duration::from_secs_f64(vm(&report, &id).duration_seconds);
            assert_within(seen, ended, ended + millis(500));
        }
    }
}

/// Before 2.59 there is no host-wide look at changed records: each
/// migration's newest record is read at each tick instead (2.65, and so
/// queueing ahead, comes later). Ends are still seen on the host within a tick.
#[tokio::test(start_paused = true)]
async fn without_changes_since_each_record_is_read_and_ends_are_still_seen_within_a_tick() {
    let cloud = FakeCloud::new();
    for id in ["a", "b", "c"] {
        cloud.add_vm(id, "ACTIVE", 512);
        cloud.script(id, &[Script::Complete { after: TEN_S }]);
    }
    cloud.lock().no_changes_since = true;

    let report = evacuate(&cloud, &Settings::default()).await;

    assert_eq!(report.result, RunResult::Succeeded, "{report:?}");
    let calls = cloud.calls();
    assert_eq!(calls.change_reads, 0);
    let ticks = (report.duration_seconds / 0.5).ceil() as usize + 1;
    assert!(
        calls.history_reads > 0 && calls.history_reads <= ticks,
        "{} record reads",
        calls.history_reads
    );
    for id in ["a", "b", "c"] {
        let ended = cloud.running_since(id)[0] + TEN_S;
        let seen = calls.live_migrate_times(id)[0] + Duration::from_secs_f64(vm(&report, id).duration_seconds);
        assert_within(seen, ended, ended + millis(500));
    }
}

/// An aborted migration's end (its record `cancelled`, the server back on
/// the source) is seen at the next look: a cancellation ends within a poll
/// interval of Nova's rollback.
#[tokio::test(start_paused = true)]
async fn an_aborted_migration_is_read_at_the_poll_interval_again() {
    let cloud = four_on_a_queueing_nova();
    cloud.script("b", &[Script::Complete { after: secs(100) }]);

    let report = evacuate_stopped(&cloud, &Settings::default(), secs(14), StopRequest::AbortInFlight).await;

    assert_eq!(cloud.calls().abort_times("b"), [secs(14)]);
    assert_eq!(vm(&report, "b").outcome, Outcome::Aborted);
    // b's end is seen at the next poll, c's (it was queued) at the one after.
    assert!(report.duration_seconds <= 15.0, "{}", report.duration_seconds);
}

#[tokio::test(start_paused = true)]
async fn a_queued_migrations_budget_starts_when_nova_runs_it() {
    let cloud = four_on_a_queueing_nova();
    for id in ["a", "b", "c", "d"] {
        cloud.script(id, &[Script::Complete { after: secs(100) }]);
    }
    let settings = Settings {
        budget: Budget::Fixed(secs(120)),
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    // b waited 100 s queued behind a, then ran 100 s: within its 120 s budget.
    assert_eq!(report.result, RunResult::Succeeded, "{report:?}");
    assert!(cloud.calls().abort.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_cancellation_aborts_the_queued_migration_too() {
    let cloud = four_on_a_queueing_nova();
    for id in ["a", "b", "c", "d"] {
        cloud.script(id, &[Script::Complete { after: secs(100) }]);
    }

    let report = evacuate_stopped(&cloud, &Settings::default(), secs(10), StopRequest::AbortInFlight).await;

    assert_eq!(cloud.calls().abort_times("a").len(), 1);
    assert_eq!(cloud.calls().abort_times("b").len(), 1, "the queued one too");
    for id in ["a", "b"] {
        assert_eq!(vm(&report, id).outcome, Outcome::Aborted);
        let server = cloud.vm(id);
        assert_eq!((server.host.as_deref(), server.task_state), (Some(SOURCE), None));
    }
    assert_eq!(vm(&report, "c").outcome, Outcome::NotStarted);
    assert!(report.duration_seconds < 15.0, "{}", report.duration_seconds);
}

#[tokio::test(start_paused = true)]
async fn a_nova_that_runs_more_than_max_parallel_gets_nothing_ahead() {
    let cloud = four_on_a_queueing_nova();
    cloud.nova_queues_beyond(None);

    let report = evacuate(&cloud, &Settings::default()).await;

    assert_eq!(report.result, RunResult::Succeeded, "{report:?}");
    let calls = cloud.calls();
    // b ran beside a from the end of its scheduling (1 s), was aborted at the
    // poll that saw it and moved again later, its withdrawn try not counted;
    // nothing else was handed ahead.
    assert_eq!(calls.abort_times("b"), [secs(1)]);
    assert_eq!(calls.live_migrate_times("b").len(), 2);
    assert_eq!(vm(&report, "b").attempts, 1);
    assert_eq!(vm(&report, "b").outcome, Outcome::Migrated);
    for (id, count) in [("a", 1), ("c", 1), ("d", 1)] {
        assert_eq!(calls.live_migrate_times(id).len(), count);
    }
    let overlapping = |x: &str, y: &str| {
        let (x, y) = (cloud.running_since(x), cloud.running_since(y));
        x.iter().any(|&s| y.iter().any(|&t| s < t + TEN_S && t < s + TEN_S))
    };
    assert!(!overlapping("c", "d") && !overlapping("b", "c") && !overlapping("c", "a"));
}

#[tokio::test(start_paused = true)]
async fn an_abort_nova_accepted_but_did_not_carry_out_is_sent_again() {
    let cloud = FakeCloud::new();
    cloud.add_vm("long", "ACTIVE", 512);
    cloud.script("long", &[Script::Complete { after: secs(100) }]);
    cloud.lock().abort_lost.push("long".into());

    let report = evacuate_stopped(&cloud, &Settings::default(), secs(10), StopRequest::AbortInFlight).await;

    let aborts = cloud.calls().abort_times("long");
    assert_eq!(aborts.len(), 2, "{aborts:?}");
    assert_within(aborts[1], secs(15), secs(18));
    assert_eq!(vm(&report, "long").outcome, Outcome::Aborted);
    let long = cloud.vm("long");
    assert_eq!((long.host.as_deref(), long.task_state), (Some(SOURCE), None));
}

#[tokio::test(start_paused = true)]
async fn error_and_suspended_vms_are_skipped_shutoff_ones_cold_migrated() {
    let cloud = FakeCloud::new();
    cloud.add_vm("broken", "ERROR", 512);
    cloud.add_vm("asleep", "SUSPENDED", 512);
    cloud.add_vm("off", "SHUTOFF", 2048);

    let report = evacuate(&cloud, &Settings::default()).await;

    for (id, status) in [("broken", "ERROR"), ("asleep", "SUSPENDED")] {
        let skipped = vm(&report, id);
        assert_eq!(skipped.outcome, Outcome::Skipped);
        assert_eq!(skipped.action, Action::Skip);
        assert!(reason(&report, id).contains(status), "{skipped:?}");
        assert_eq!(cloud.vm(id).host.as_deref(), Some(SOURCE));
    }
    let calls = cloud.calls();
    assert_eq!(calls.starts, ["off"]);
    assert!(calls.live_migrate.is_empty());
    assert_eq!(calls.confirm_resize, ["off"]);
    let off = vm(&report, "off");
    assert_eq!((off.action, &off.outcome), (Action::ColdMigrate, &Outcome::Migrated));
    let server = cloud.vm("off");
    assert_eq!(server.status, "SHUTOFF");
    assert_eq!(server.task_state, None);
    assert_eq!(off.destination, server.host);
    assert_eq!(cloud.migration_statuses("off"), ["confirmed"]);

    assert_eq!(report.result, RunResult::Failed);
    assert_eq!(report.servers_left_on_host, 2);
    assert_eq!(report.exit_code(), 1);
}

#[tokio::test(start_paused = true)]
async fn vm_deleted_while_migrating_counts_as_gone() {
    let cloud = FakeCloud::new();
    cloud.add_vm("doomed", "ACTIVE", 512);
    cloud.script("doomed", &[Script::Complete { after: secs(60) }]);
    let settings = Settings::default();
    let (_never_stop, stop) = watch::channel(StopRequest::Continue);
    let target = target();
    let engine = Engine::new(&cloud, &settings, &Quiet);

    let (report, ()) = tokio::join!(engine.evacuate(&target, stop), async {
        sleep(secs(10)).await;
        cloud.delete_vm("doomed");
    });
    let report = report.unwrap();

    assert_eq!(vm(&report, "doomed").outcome, Outcome::Deleted);
    assert!(report.duration_seconds < 11.0);
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.servers_left_on_host, 0);
}

/// A migration that failed before the first look at the records that
/// answered, further back than that look reaches (Nova was unreachable
/// meanwhile), is still seen and tried again: a flight whose record no look
/// has shown reads its own.
#[tokio::test(start_paused = true)]
async fn a_failure_older_than_the_first_answered_look_is_still_seen() {
    let cloud = FakeCloud::new();
    cloud.add_vm("early", "ACTIVE", 512);
    cloud.script(
        "early",
        &[Script::Fail { after: millis(100) }, Script::Complete { after: secs(5) }],
    );
    let settings = Settings {
        retry_backoff: secs(1),
        ..Settings::default()
    };
    let (_never_stop, stop) = watch::channel(StopRequest::Continue);
    let target = target();
    let engine = Engine::new(&cloud, &settings, &Quiet);

    let (report, ()) = tokio::join!(engine.evacuate(&target, stop), async {
        sleep(millis(200)).await;
        cloud.set_nova_down(true);
        sleep(secs(10)).await;
        cloud.set_nova_down(false);
    });
    let report = report.unwrap();

    assert_eq!(report.result, RunResult::Succeeded, "{report:?}");
    let starts = cloud.calls().live_migrate_times("early");
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert_within(starts[1], secs(11), secs(12));
}

#[tokio::test(start_paused = true)]
async fn running_again_after_success_changes_nothing() {
    let cloud = FakeCloud::new();
    cloud.add_vm("a", "ACTIVE", 512);
    cloud.add_vm("b", "SHUTOFF", 512);
    let settings = Settings::default();
    let first = evacuate(&cloud, &settings).await;
    assert_eq!(first.result, RunResult::Succeeded);
    let before = cloud.calls();

    let again = evacuate(&cloud, &settings).await;

    assert_eq!(again.result, RunResult::Succeeded);
    assert!(again.vms.is_empty());
    assert!(again.service_disabled_by_us);
    assert_eq!(again.service_disabled_reason, first.service_disabled_reason);
    let after = cloud.calls();
    assert_eq!(after.disable.len(), 1);
    assert_eq!(after.starts, before.starts);
    assert_eq!(after.confirm_resize, before.confirm_resize);
}

#[tokio::test(start_paused = true)]
async fn cold_migration_left_unconfirmed_by_an_interrupted_run_is_confirmed_next_time() {
    let cloud = FakeCloud::new();
    cloud.add_vm("off", "SHUTOFF", 1024);
    cloud.script("off", &[Script::Complete { after: secs(20) }]);
    let settings = Settings::default();

    let first = evacuate_stopped(&cloud, &settings, secs(5), StopRequest::LeaveInFlight).await;
    assert_eq!(vm(&first, "off").outcome, Outcome::InProgress);
    sleep(secs(30)).await;
    assert_eq!(
        cloud.vm("off").status,
        "VERIFY_RESIZE",
        "moved, waiting for a confirmation"
    );

    let again = evacuate(&cloud, &settings).await;

    assert_eq!(cloud.calls().confirm_resize, ["off"]);
    let off = cloud.vm("off");
    assert_eq!((off.status.as_str(), off.task_state), ("SHUTOFF", None));
    assert_eq!(again.result, RunResult::Succeeded);
}

/// The failures Nova's records show, followed by the host-wide look at
/// changed records (three at a time): each ends as when its server is read
/// on its own.
#[tokio::test(start_paused = true)]
async fn failures_are_told_apart_when_followed_by_one_look_per_tick() {
    let cloud = FakeCloud::new();
    for id in ["lost-reply", "orphan", "flaky", "fine"] {
        cloud.add_vm(id, "ACTIVE", 512);
    }
    cloud.script(
        "lost-reply",
        &[
            Script::ConductorError { after: secs(60) },
            Script::Complete { after: secs(5) },
        ],
    );
    cloud.script("orphan", &[Script::DestinationLost { after: secs(10) }]);
    cloud.script(
        "flaky",
        &[Script::Fail { after: secs(5) }, Script::Complete { after: secs(5) }],
    );
    cloud.script("fine", &[Script::Complete { after: secs(20) }]);
    let settings = Settings {
        max_parallel: 3,
        retries: 1,
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    let calls = cloud.calls();
    assert!(calls.change_reads > 0, "followed host-wide");
    assert_eq!(calls.reset_to_active, ["lost-reply"]);
    assert_eq!(cloud.migration_statuses("lost-reply"), ["error", "completed"]);
    assert_eq!(vm(&report, "lost-reply").outcome, Outcome::Migrated, "{report:?}");
    let orphan = vm(&report, "orphan");
    assert_eq!(orphan.outcome, Outcome::Failed);
    assert!(reason(&report, "orphan").contains("never took it over"), "{orphan:?}");
    assert!(orphan.duration_seconds < 80.0, "{orphan:?}");
    assert_eq!(calls.live_migrate_times("orphan").len(), 1, "never started twice");
    assert_eq!(vm(&report, "flaky").outcome, Outcome::Migrated);
    assert_eq!(vm(&report, "flaky").attempts, 2);
    assert_eq!(vm(&report, "fine").outcome, Outcome::Migrated);
    assert!(calls.abort.is_empty(), "{:?}", calls.abort);
    assert_eq!(report.result, RunResult::Failed);
}

// ---------------------------------------------------------------------------
// Per-VM policy from Nova server tags
// ---------------------------------------------------------------------------

/// The owner's tag comes first, then the node's default, then the state
/// policy; a node default Nova cannot follow in a VM's state gives way to
/// the state policy.
#[tokio::test(start_paused = true)]
async fn a_tag_outranks_the_node_default_which_outranks_the_state_policy() {
    let cloud = FakeCloud::new();
    cloud.add_vm("tagged-live", "ACTIVE", 512);
    cloud.tag("tagged-live", "nova-drain:live-migrate");
    cloud.add_vm("defaulted", "ACTIVE", 512);
    cloud.add_vm("off", "SHUTOFF", 512);
    cloud.add_vm("tagged-cold", "ACTIVE", 256);
    cloud.tag("tagged-cold", "nova-drain:cold-migrate");
    cloud.tag("tagged-cold", "owner-label"); // not ours: ignored
    let settings = Settings {
        node_default: Some(VmPolicy::Leave),
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    let by = |id| {
        let vm = vm(&report, id);
        (vm.action, vm.from.source, vm.from.tag.clone(), vm.outcome.clone())
    };
    let tag = |t: &str| Some(t.to_string());
    assert_eq!(
        by("tagged-live"),
        (
            Action::LiveMigrate,
            ActionSource::Tag,
            tag("nova-drain:live-migrate"),
            Outcome::Migrated
        )
    );
    assert_eq!(
        by("tagged-cold"),
        (
            Action::ColdMigrate,
            ActionSource::Tag,
            tag("nova-drain:cold-migrate"),
            Outcome::Migrated
        )
    );
    assert_eq!(
        by("defaulted"),
        (Action::Skip, ActionSource::NodeDefault, None, Outcome::Left)
    );
    // `leave` is possible in every state: the node's default decides for the SHUTOFF VM too.
    assert_eq!(
        by("off"),
        (Action::Skip, ActionSource::NodeDefault, None, Outcome::Left)
    );
    assert_eq!(cloud.vm("defaulted").host.as_deref(), Some(SOURCE));
    assert_eq!(
        report.result,
        RunResult::Succeeded,
        "VMs left as asked do not fail the run: {report:?}"
    );
    assert_eq!(report.servers_left_on_host, 2);

    let json = serde_json::to_value(vm(&report, "tagged-live")).expect("json");
    assert_eq!(json["action_source"], "tag");
    assert_eq!(json["tag"], "nova-drain:live-migrate");
    let json = serde_json::to_value(vm(&report, "defaulted")).expect("json");
    assert_eq!(
        (&json["action_source"], &json["outcome"]),
        (&"node-default".into(), &"left".into())
    );

    // A node default of live-migrate cannot apply to a SHUTOFF VM: the state policy cold-migrates it.
    let cloud = FakeCloud::new();
    cloud.add_vm("off", "SHUTOFF", 512);
    let settings = Settings {
        node_default: Some(VmPolicy::LiveMigrate),
        ..Settings::default()
    };
    let report = evacuate(&cloud, &settings).await;
    let off = vm(&report, "off");
    assert_eq!(
        (off.action, off.from.source),
        (Action::ColdMigrate, ActionSource::StatePolicy)
    );
    assert_eq!(report.result, RunResult::Succeeded);
}

/// Two of our tags, an unknown `nova-drain:` tag, or a tag Nova cannot
/// follow in the VM's state: the VM is not touched, counts as failed, and
/// the reason names the tags. Nothing is guessed.
#[tokio::test(start_paused = true)]
async fn conflicting_unknown_or_impossible_tags_are_reported_failed_and_the_vm_untouched() {
    let cloud = FakeCloud::new();
    cloud.add_vm("both", "ACTIVE", 512);
    cloud.tag("both", "nova-drain:live-migrate");
    cloud.tag("both", "nova-drain:stop");
    cloud.add_vm("typo", "ACTIVE", 512);
    cloud.tag("typo", "nova-drain:live-migrat");
    cloud.add_vm("off", "SHUTOFF", 512);
    cloud.tag("off", "nova-drain:live-migrate");
    cloud.add_vm("plain", "ACTIVE", 512);

    let report = evacuate(&cloud, &Settings::default()).await;

    for (id, words) in [
        (
            "both",
            &["conflicting", "nova-drain:live-migrate", "nova-drain:stop"][..],
        ),
        ("typo", &["unknown", "nova-drain:live-migrat"][..]),
        ("off", &["nova-drain:live-migrate", "SHUTOFF"][..]),
    ] {
        let vm = vm(&report, id);
        assert_eq!((vm.action, &vm.outcome), (Action::Skip, &Outcome::Failed), "{vm:?}");
        assert_eq!(vm.from.source, ActionSource::Tag);
        for word in words {
            assert!(reason(&report, id).contains(word), "{id}: {}", reason(&report, id));
        }
        assert_eq!(cloud.vm(id).host.as_deref(), Some(SOURCE));
    }
    let calls = cloud.calls();
    assert_eq!(calls.starts, ["plain"]);
    assert!(calls.lifecycle.is_empty(), "{:?}", calls.lifecycle);
    assert_eq!(report.result, RunResult::Failed);

    // The dry run foresees it.
    let cloud = FakeCloud::new();
    cloud.add_vm("both", "ACTIVE", 512);
    cloud.tag("both", "nova-drain:leave");
    cloud.tag("both", "nova-drain:cold-migrate");
    let preview = Engine::new(&cloud, &Settings::default(), &Quiet)
        .preview(&target())
        .await
        .expect("preview");
    let prediction = preview.prediction.expect("a prediction");
    assert_eq!((prediction.result, prediction.exit_code), (RunResult::Failed, 1));
    assert!(prediction.why.unwrap_or_default().contains("nova-drain: tags"));
}

/// A VM tagged stop is stopped before any migration, our marker written
/// before the stop request; one its owner stopped already is left as it is
/// without a marker. The run succeeds with only those on the host; the
/// restore starts exactly the VM we stopped and removes the marker.
#[tokio::test(start_paused = true)]
async fn stop_marks_first_then_stops_and_restore_starts_only_our_vms() {
    let cloud = FakeCloud::new();
    cloud.add_vm("db", "ACTIVE", 2048);
    cloud.tag("db", "nova-drain:stop");
    cloud.add_vm("owner-off", "SHUTOFF", 512);
    cloud.tag("owner-off", "nova-drain:stop");
    cloud.add_vm("web", "ACTIVE", 512);
    let settings = Settings::default();

    let report = evacuate(&cloud, &settings).await;

    let marker = STOPPED_BY_US_TAG;
    let calls = cloud.calls();
    assert_eq!(calls.lifecycle, [format!("tag db {marker}"), "stop db".to_string()]);
    let stopped_at = cloud.now();
    assert!(
        calls.live_migrate_times("web")[0] >= secs(3),
        "the stop (3 s) comes first: {:?}",
        calls.live_migrate
    );
    assert!(stopped_at >= secs(3));
    let db = vm(&report, "db");
    assert_eq!((db.action, &db.outcome), (Action::Stop, &Outcome::Stopped), "{db:?}");
    assert_eq!(db.from.tag.as_deref(), Some("nova-drain:stop"));
    let server = cloud.vm("db");
    assert_eq!(
        (server.status.as_str(), server.host.as_deref()),
        ("SHUTOFF", Some(SOURCE))
    );
    assert!(server.tags.unwrap_or_default().iter().any(|t| t == marker));
    let owner_off = vm(&report, "owner-off");
    assert_eq!(owner_off.outcome, Outcome::Left);
    assert!(reason(&report, "owner-off").contains("stopped by its owner"));
    assert!(
        !cloud
            .vm("owner-off")
            .tags
            .unwrap_or_default()
            .iter()
            .any(|t| t == marker)
    );
    assert_eq!(vm(&report, "web").outcome, Outcome::Migrated);
    assert_eq!(
        report.vms.len(),
        3,
        "each VM once, the stopped one not again from the second listing"
    );
    assert_eq!(report.result, RunResult::Succeeded, "{report:?}");
    assert_eq!(report.exit_code(), 0);
    let json = serde_json::to_value(&report).expect("json");
    assert!(
        json["vms"]
            .as_array()
            .expect("vms")
            .iter()
            .any(|vm| vm["outcome"] == "stopped")
    );
    let human = report.to_human(&View {
        width: Some(100),
        ..View::default()
    });
    let header = human.lines().find(|l| l.starts_with("id")).unwrap_or_default();
    assert!(header.contains("action  by"), "{human}");
    assert!(human.lines().all(|l| l.chars().count() <= 100), "{human}");
    assert!(human.contains("stop    tag") && human.contains("stopped"), "{human}");
    assert!(human.contains("starts the 1 VM(s) it stopped"), "{human}");

    let engine = Engine::new(&cloud, &settings, &Quiet);
    let dry = RestoreOptions {
        dry_run: true,
        ..RestoreOptions::default()
    };
    let would = engine.restore_and_start(&target(), dry).await.expect("dry restore");
    assert_eq!(would.restarts.len(), 1);
    assert_eq!(would.restarts[0].outcome, RestartOutcome::WouldStart);
    assert_eq!(cloud.vm("db").status, "SHUTOFF", "a dry run changes nothing");

    let restored = engine
        .restore_and_start(&target(), RestoreOptions::default())
        .await
        .expect("restore");
    assert_eq!(restored.outcome, RestoreOutcome::Enabled);
    let started: Vec<(&str, RestartOutcome)> = restored.restarts.iter().map(|r| (r.id.as_str(), r.outcome)).collect();
    assert_eq!(started, [("db", RestartOutcome::Started)]);
    assert_eq!(cloud.vm("db").status, "ACTIVE");
    assert!(!cloud.vm("db").tags.unwrap_or_default().iter().any(|t| t == marker));
    assert_eq!(cloud.vm("owner-off").status, "SHUTOFF", "never started by us");
    assert!(restored.describe(SOURCE).contains("vm-db (db): started again"));
    assert_eq!(restored.exit_code(), 0);
}

/// The marker is what survives a restart: a later process (the restore of a
/// new agent) starts the VM from it alone; a marked VM its owner started
/// meanwhile only loses the marker.
#[tokio::test(start_paused = true)]
async fn the_marker_alone_tells_a_later_restore_what_to_start() {
    let cloud = FakeCloud::new();
    for id in ["ours", "restarted-by-owner"] {
        cloud.add_vm(id, "SHUTOFF", 512);
        cloud.tag(id, STOPPED_BY_US_TAG);
    }
    cloud.power_by_owner("restarted-by-owner", true);
    cloud.add_vm("owners", "SHUTOFF", 512);
    cloud.disable_by_operator(&disabled_reason(&target(), jiff::Timestamp::now()));

    let restored = Engine::new(&cloud, &Settings::default(), &Quiet)
        .restore_and_start(&target(), RestoreOptions::default())
        .await
        .expect("restore");

    let mut outcomes: Vec<(&str, RestartOutcome)> =
        restored.restarts.iter().map(|r| (r.id.as_str(), r.outcome)).collect();
    outcomes.sort_unstable_by_key(|(id, _)| *id);
    assert_eq!(
        outcomes,
        [
            ("ours", RestartOutcome::Started),
            ("restarted-by-owner", RestartOutcome::Unmarked)
        ]
    );
    assert_eq!(cloud.vm("owners").status, "SHUTOFF");
    let lifecycle = cloud.calls().lifecycle;
    assert!(!lifecycle.iter().any(|c| c.contains("owners")), "{lifecycle:?}");
    assert!(!lifecycle.contains(&"start restarted-by-owner".to_string()));
}

/// No marker, no stop: a VM whose marker cannot be written keeps running,
/// and the run reports it failed.
#[tokio::test(start_paused = true)]
async fn a_vm_whose_marker_cannot_be_written_is_not_stopped() {
    let cloud = FakeCloud::new();
    cloud.add_vm("db", "ACTIVE", 512);
    cloud.tag("db", "nova-drain:stop");
    cloud.lock().tag_writes_fail = true;

    let report = evacuate(&cloud, &Settings::default()).await;

    assert_eq!(vm(&report, "db").outcome, Outcome::Failed);
    assert!(reason(&report, "db").contains("marker"), "{}", reason(&report, "db"));
    assert_eq!(cloud.vm("db").status, "ACTIVE");
    assert!(!cloud.calls().lifecycle.iter().any(|c| c.starts_with("stop")));
    assert_eq!(report.result, RunResult::Failed);
}

/// Below compute API 2.26 no tag is read: a warning says so once, the VMs
/// are planned by the other levels, and a node default of stop is not
/// carried out (the marker cannot be written).
#[tokio::test(start_paused = true)]
async fn below_microversion_2_26_tags_are_not_read_and_nothing_is_stopped() {
    let cloud = FakeCloud::new();
    cloud.add_vm("a", "ACTIVE", 512);
    cloud.add_vm("b", "ACTIVE", 512);
    cloud.without_tags();
    let settings = Settings {
        node_default: Some(VmPolicy::Stop),
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    assert!(report.warnings[0].contains("2.26"));
    assert!(
        report
            .to_human(&View::default())
            .contains("warning: the compute API version in use is below 2.26")
    );
    for id in ["a", "b"] {
        let vm = vm(&report, id);
        assert_eq!(
            (vm.action, vm.from.source, &vm.outcome),
            (Action::Stop, ActionSource::NodeDefault, &Outcome::Failed)
        );
        assert!(reason(&report, id).contains("2.26"));
        assert_eq!(cloud.vm(id).status, "ACTIVE");
    }
    assert!(cloud.calls().lifecycle.is_empty());
    assert_eq!(report.result, RunResult::Failed);

    let restored = Engine::new(&cloud, &settings, &Quiet)
        .restore_and_start(&target(), RestoreOptions::default())
        .await
        .expect("restore");
    assert!(restored.restarts.is_empty());
}

#[tokio::test(start_paused = true)]
async fn one_vm_moves_to_the_chosen_host_and_the_service_is_left_as_it_is() {
    let cloud = FakeCloud::new();
    cloud.add_vm("a", "ACTIVE", 2048);
    cloud.add_vm("b", "ACTIVE", 1024);
    cloud.other_hosts(&[("cmp-1", 65536), ("cmp-2", 65536), ("cmp-3", 65536)]);
    cloud.script("a", &[Script::Complete { after: secs(5) }]);
    let settings = Settings {
        destination: Some("cmp-2".into()),
        ..Settings::default()
    };
    let (_never_stop, stop) = watch::channel(StopRequest::Continue);

    let report = Engine::new(&cloud, &settings, &Quiet)
        .move_one(&target(), cloud.vm("a"), stop)
        .await;

    assert_eq!(report.outcome, Outcome::Migrated, "{report:?}");
    assert_eq!(report.destination.as_deref(), Some("cmp-2"));
    assert_eq!(cloud.vm("a").host.as_deref(), Some("cmp-2"));
    assert_eq!(cloud.vm("b").host.as_deref(), Some(SOURCE), "only the one VM moves");
    let calls = cloud.calls();
    assert_eq!(calls.live_destinations, [Some("cmp-2".to_string())]);
    assert!(
        calls.disable.is_empty() && cloud.service().enabled,
        "the service is not touched"
    );
}

#[tokio::test(start_paused = true)]
async fn one_vm_whose_move_fails_stays_on_its_host_and_is_reported_failed() {
    let cloud = FakeCloud::new();
    cloud.add_vm("a", "ACTIVE", 2048);
    cloud.script("a", &[Script::Fail { after: secs(3) }]);
    let settings = Settings {
        destination: Some("cmp-nowhere".into()),
        retries: 0,
        ..Settings::default()
    };
    let (_never_stop, stop) = watch::channel(StopRequest::Continue);

    let report = Engine::new(&cloud, &settings, &Quiet)
        .move_one(&target(), cloud.vm("a"), stop)
        .await;

    assert_eq!(report.outcome, Outcome::Failed, "{report:?}");
    let a = cloud.vm("a");
    assert_eq!((a.host.as_deref(), a.status.as_str()), (Some(SOURCE), "ACTIVE"));
}
