//! `spokelet run --leader-elect` as real processes (the built binary) against the real API
//! server: one replica of several applies works, the standbys write nothing, a killed leader is
//! replaced, a leader frozen with SIGSTOP writes nothing once it resumes after its Lease passed
//! to another (it exits instead), and SIGTERM hands the Lease over at once.
//!
//! Lease timings are shortened (3 s lease, 2 s renew deadline, 0.5 s retry) so the test runs in
//! seconds; the logic is the same as with the defaults.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use spokelet_e2e::{create_namespace, eventually_with, lease_holder, shared_spoke, unique_name};

/// One `spokelet run` process; killed when dropped.
struct Replica {
    identity: String,
    child: tokio::process::Child,
    log: PathBuf,
}

impl Replica {
    /// Starts a replica named `identity` applying the works in `works` (its own field manager,
    /// so the objects' managedFields say who wrote them).
    fn start(identity: &str, works: &Path, namespace: &str, kubeconfig: &Path, scratch: &Path) -> Replica {
        let log = scratch.join(format!("{identity}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_spokelet"))
            .args(["run", "--leader-elect"])
            .args(["--works-dir", &works.display().to_string()])
            .args(["--kubeconfig", &kubeconfig.display().to_string()])
            .args(["--agent-namespace", namespace, "--agent-id", identity])
            .args(["--leader-identity", identity, "--field-manager", identity])
            .args(["--leader-lease-duration", "3s", "--leader-renew-deadline", "2s"])
            .args(["--leader-retry-period", "500ms", "--works-poll-interval", "200ms"])
            .args(["--admin-addr", "127.0.0.1:0", "--shutdown-grace", "10s"])
            .args([
                "--artifact-cache",
                &scratch.join(format!("{identity}-cache")).display().to_string(),
            ])
            .env("SPOKELET_LOG", "info")
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Replica {
            identity: identity.to_string(),
            child,
            log,
        }
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("running").to_string();
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap();
        assert!(ok.success(), "kill {sig} {pid}");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

async fn holder(client: &kube::Client, ns: &str) -> Option<String> {
    lease_holder(client, ns, "spokelet-work-engine").await
}

/// Waits until the Lease names one of `among`; returns it.
async fn wait_holder(client: &kube::Client, ns: &str, among: &[&str]) -> String {
    let among: Vec<String> = among.iter().map(|s| s.to_string()).collect();
    eventually_with(
        &format!("one of {among:?} holds the lease"),
        300,
        Duration::from_millis(200),
        || {
            let (c, n, among) = (client.clone(), ns.to_string(), among.clone());
            async move {
                match holder(&c, &n).await {
                    Some(h) if among.contains(&h) => Ok(h),
                    other => Err(format!("holder {other:?}")),
                }
            }
        },
    )
    .await
    .unwrap()
}

fn write_work(works: &Path, target_ns: &str, value: &str) {
    let work = format!(
        "apiVersion: work.open-cluster-management.io/v1\nkind: ManifestWork\nmetadata:\n  name: elected\nspec:\n  workload:\n    manifests:\n      - apiVersion: v1\n        kind: ConfigMap\n        metadata:\n          name: elected\n          namespace: {target_ns}\n        data:\n          value: \"{value}\"\n"
    );
    let aside = works.join(".elected.tmp");
    std::fs::write(&aside, work).unwrap();
    std::fs::rename(aside, works.join("elected.yaml")).unwrap();
}

async fn cm(client: &kube::Client, ns: &str) -> Option<ConfigMap> {
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt("elected")
        .await
        .ok()
        .flatten()
}

async fn wait_value(client: &kube::Client, ns: &str, value: &str, replicas: &[Replica]) {
    let logs = || {
        replicas
            .iter()
            .map(|r| format!("--- {}:\n{}", r.identity, r.log()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    eventually_with(
        &format!("the ConfigMap holds {value}"),
        300,
        Duration::from_millis(200),
        || {
            let (c, n, v) = (client.clone(), ns.to_string(), value.to_string());
            async move {
                let got = cm(&c, &n)
                    .await
                    .and_then(|c| c.data)
                    .and_then(|d| d.get("value").cloned());
                if got.as_deref() == Some(v.as_str()) {
                    Ok(())
                } else {
                    Err(format!("value {got:?}"))
                }
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
}

/// The field managers in the ConfigMap's managedFields, with the time of each entry.
async fn managers(client: &kube::Client, ns: &str) -> Vec<(String, Option<SystemTime>)> {
    cm(client, ns)
        .await
        .and_then(|c| c.metadata.managed_fields)
        .unwrap_or_default()
        .into_iter()
        .map(|f| {
            let at = f
                .time
                .map(|t| SystemTime::UNIX_EPOCH + Duration::from_secs(t.0.as_second().max(0) as u64));
            (f.manager.unwrap_or_default(), at)
        })
        .collect()
}

/// What each election test starts from: the agent's namespace (the Lease), the one works
/// write to (the built-in policy keeps works out of the agent's own), and a works directory
/// holding the work with value `one`.
struct Scene {
    agent_ns: String,
    ns: String,
    scratch: tempfile::TempDir,
    works: PathBuf,
}

impl Scene {
    async fn new(client: &kube::Client, prefix: &str) -> Scene {
        let agent_ns = unique_name(&format!("{prefix}-agent"));
        let ns = unique_name(&format!("{prefix}-works"));
        create_namespace(client, &agent_ns).await.unwrap();
        create_namespace(client, &ns).await.unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let works = scratch.path().join("works");
        std::fs::create_dir_all(&works).unwrap();
        write_work(&works, &ns, "one");
        Scene {
            agent_ns,
            ns,
            scratch,
            works,
        }
    }
}

async fn exited(r: &mut Replica, within: Duration) -> Option<std::process::ExitStatus> {
    tokio::time::timeout(within, r.child.wait())
        .await
        .ok()
        .map(|s| s.unwrap())
}

#[tokio::test]
async fn one_replica_applies_a_frozen_leader_writes_nothing_after_resuming_and_sigterm_hands_over() {
    let spoke = shared_spoke().await;
    let client = spoke.client();
    let Scene {
        agent_ns,
        ns,
        scratch,
        works,
    } = Scene::new(&client, "leader").await;
    let kubeconfig = spoke.kubeconfig_path();
    let mut replicas: Vec<Replica> = ["replica-a", "replica-b", "replica-c"]
        .iter()
        .map(|id| Replica::start(id, &works, &agent_ns, kubeconfig, scratch.path()))
        .collect();

    // One leader; only it writes.
    let leader = wait_holder(&client, &agent_ns, &["replica-a", "replica-b", "replica-c"]).await;
    wait_value(&client, &ns, "one", &replicas).await;
    // Several renew periods pass: the standbys have had every chance to write.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writers: Vec<String> = managers(&client, &ns).await.into_iter().map(|(m, _)| m).collect();
    assert_eq!(writers, vec![leader.clone()], "only the leader wrote the object");
    for r in replicas.iter().filter(|r| r.identity != leader) {
        let log = r.log();
        assert!(
            log.contains("standby: waiting for the work-engine lease"),
            "{log}"
        );
        assert!(
            !log.contains("work engine starting"),
            "a standby started its engine: {log}"
        );
    }
    assert_eq!(holder(&client, &agent_ns).await.as_deref(), Some(leader.as_str()));

    // Freeze the leader; another takes the Lease once it lapses.
    let frozen = replicas.iter().position(|r| r.identity == leader).unwrap();
    replicas[frozen].signal("-STOP");
    let stopped = Instant::now();
    let others: Vec<&str> = replicas
        .iter()
        .filter(|r| r.identity != leader)
        .map(|r| r.identity.as_str())
        .collect();
    let successor = wait_holder(&client, &agent_ns, &others).await;
    println!("failover after SIGSTOP: {:?}", stopped.elapsed());

    // The successor applies a change; then the frozen leader resumes.
    write_work(&works, &ns, "two");
    wait_value(&client, &ns, "two", &replicas).await;
    let resumed = SystemTime::now();
    replicas[frozen].signal("-CONT");
    let status = exited(&mut replicas[frozen], Duration::from_secs(30))
        .await
        .expect("the old leader exits once it finds its lease gone");
    assert!(!status.success(), "lost leadership is an error exit: {status}");
    let log = replicas[frozen].log();
    assert!(log.contains("lost the work-engine lease"), "{log}");
    for line in log
        .lines()
        .filter(|l| l.contains("lease") || l.contains("refused"))
    {
        println!("old leader: {line}");
    }
    // Give any write it might still have made time to land, then look.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let resumed_floor = resumed - Duration::from_secs(1);
    for (manager, at) in managers(&client, &ns).await {
        if manager == leader {
            assert!(
                at.is_some_and(|t| t < resumed_floor),
                "the old leader wrote after resuming ({at:?} vs resume at {resumed:?})"
            );
        }
    }
    assert_eq!(
        holder(&client, &agent_ns).await.as_deref(),
        Some(successor.as_str())
    );
    let value = cm(&client, &ns)
        .await
        .and_then(|c| c.data)
        .and_then(|d| d.get("value").cloned());
    assert_eq!(value.as_deref(), Some("two"));

    // SIGKILL the successor: the remaining standby takes over after the lease lapses.
    let killed = replicas.iter().position(|r| r.identity == successor).unwrap();
    replicas[killed].child.start_kill().unwrap();
    let killed_at = Instant::now();
    let last: Vec<&str> = replicas
        .iter()
        .filter(|r| r.identity != leader && r.identity != successor)
        .map(|r| r.identity.as_str())
        .collect();
    let third = wait_holder(&client, &agent_ns, &last).await;
    println!("failover after SIGKILL: {:?}", killed_at.elapsed());
    write_work(&works, &ns, "three");
    wait_value(&client, &ns, "three", &replicas).await;

    // SIGTERM: the engine drains, the Lease is released (no holder), exit 0.
    let last_one = replicas.iter().position(|r| r.identity == third).unwrap();
    replicas[last_one].signal("-TERM");
    let status = exited(&mut replicas[last_one], Duration::from_secs(30))
        .await
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status}: {}", replicas[last_one].log());
    assert_eq!(holder(&client, &agent_ns).await, None, "the lease was released");
}

/// The Lease's renewTime, as the API server holds it.
async fn renew_time(client: &kube::Client, ns: &str) -> Option<String> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), ns);
    let lease = leases.get_opt("spokelet-work-engine").await.ok().flatten()?;
    lease.spec?.renew_time.map(|t| format!("{:?}", t.0))
}

/// A leader whose connection to the API server stalls right after a renewal (requests neither
/// answered nor refused): its writes in flight are abandoned at the renew deadline, it exits
/// instead of hanging on them, and the standby takes over; nothing of the old leader lands.
#[tokio::test]
async fn a_leader_whose_connection_stalls_after_a_renewal_exits_and_writes_nothing_more() {
    let spoke = shared_spoke().await;
    let client = spoke.client();
    let Scene {
        agent_ns,
        ns,
        scratch,
        works,
    } = Scene::new(&client, "stall").await;
    // replica-a reaches the API server only through the front.
    let server = spoke.server_url();
    let front = spokelet_e2e::StallingFront::start(server.trim_start_matches("https://"))
        .await
        .unwrap();
    let through_front = scratch.path().join("front.kubeconfig");
    let text = std::fs::read_to_string(spoke.kubeconfig_path()).unwrap();
    assert!(text.contains(&server), "the kubeconfig names {server}");
    std::fs::write(
        &through_front,
        text.replace(&server, &format!("https://{}", front.host())),
    )
    .unwrap();
    let mut replicas = vec![Replica::start(
        "replica-a",
        &works,
        &agent_ns,
        &through_front,
        scratch.path(),
    )];
    wait_holder(&client, &agent_ns, &["replica-a"]).await;
    wait_value(&client, &ns, "one", &replicas).await;
    replicas.push(Replica::start(
        "replica-b",
        &works,
        &agent_ns,
        spoke.kubeconfig_path(),
        scratch.path(),
    ));

    // Right after a renewal: stall, and give the leader something to write.
    let seen = renew_time(&client, &agent_ns).await;
    eventually_with("the lease is renewed", 300, Duration::from_millis(20), || {
        let (c, n, seen) = (client.clone(), agent_ns.clone(), seen.clone());
        async move {
            let now = renew_time(&c, &n).await;
            if now != seen {
                Ok(())
            } else {
                Err(format!("renewTime {now:?}"))
            }
        }
    })
    .await
    .unwrap();
    front.stall();
    let stalled = Instant::now();
    let stalled_at = SystemTime::now();
    write_work(&works, &ns, "two");

    // It finds it cannot renew, and exits rather than wait on requests that never end.
    let status = exited(&mut replicas[0], Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("the stalled leader is still running:\n{}", replicas[0].log()));
    println!("stalled leader exited {:?} after the stall", stalled.elapsed());
    assert!(!status.success(), "lost leadership is an error exit: {status}");
    let log = replicas[0].log();
    assert!(log.contains("lost the work-engine lease"), "{log}");
    assert!(
        front.dropped() > 0,
        "the leader did send into the stalled connection"
    );

    // The standby takes over and applies the change; the old leader wrote nothing after the
    // stall (managedFields time is to the second).
    wait_holder(&client, &agent_ns, &["replica-b"]).await;
    wait_value(&client, &ns, "two", &replicas).await;
    let floor = stalled_at - Duration::from_secs(1);
    for (manager, at) in managers(&client, &ns).await {
        if manager == "replica-a" {
            assert!(
                at.is_some_and(|t| t < floor),
                "replica-a wrote after the stall: {at:?}"
            );
        }
    }
    drop(front);
}
