//! The bare-metal node service `deploy/systemd/spokelet-node.service` keeps the confinement it
//! promises: `systemd-analyze security` rates it at most [`MAX_EXPOSURE`], every hardening
//! check the unit sets out to pass passes, the only failed checks are the exposures a
//! networked GPU service cannot avoid, `systemd-analyze verify` accepts the unit with its hub
//! drop-in, and the unit file itself allows no device but the NVIDIA ones and no capability.
//!
//! The `systemd-analyze` tests need `/usr/bin/systemd-analyze` (Debian's `systemd` package,
//! installed by tests/env/install.sh). Without it they say so on stderr and return, unless
//! `SPOKELET_TEST_REQUIRE_SYSTEMD=1`, which makes its absence a failure. The file checks need
//! nothing.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The highest overall exposure the unit may be rated. systemd 252 rates it 1.3 ("OK"): what
/// remains is what a service that dials the hub and opens GPUs must keep (IP sockets, the host
/// network, the NVIDIA device nodes, non-process /proc files, see [`ACCEPTED_EXPOSURES`]). The
/// 0.2 of headroom is for systemd releases that weigh the checks differently; losing the
/// system call filter (2.9), the capability bounding set (3.4) or the namespace restriction
/// (2.0) alone goes past it. The directives that weigh less are checked one by one below.
const MAX_EXPOSURE: f64 = 1.5;

/// Checks of `systemd-analyze security` that the unit must pass, by name prefix: the
/// hardening the unit is there for. A prefix ending in `~` covers every row of that family
/// (each capability group, each namespace type, each system call group).
const MUST_PASS: &[&str] = &[
    "User=/DynamicUser=",
    "ProtectSystem=",
    "ProtectHome=",
    "PrivateTmp=",
    "ProtectKernelTunables=",
    "ProtectKernelModules=",
    "ProtectKernelLogs=",
    "ProtectControlGroups=",
    "ProtectClock=",
    "ProtectHostname=",
    "ProtectProc=",
    "RestrictNamespaces=~",
    "LockPersonality=",
    "MemoryDenyWriteExecute=",
    "RestrictRealtime=",
    "RestrictSUIDSGID=",
    "NoNewPrivileges=",
    "CapabilityBoundingSet=~",
    "AmbientCapabilities=",
    "SystemCallArchitectures=",
    "SystemCallFilter=~",
    "RestrictAddressFamilies=~AF_PACKET",
    "RestrictAddressFamilies=~AF_NETLINK",
    "PrivateMounts=",
    "KeyringMode=",
    "RemoveIPC=",
    "UMask=",
];

/// The checks the unit fails on purpose, each for a reason the unit file gives.
const ACCEPTED_EXPOSURES: &[(&str, &str)] = &[
    (
        "RootDirectory=/RootImage=",
        "the binary runs from the host's /usr/local/bin",
    ),
    (
        "SupplementaryGroups=",
        "`video` opens the GPU device nodes where they are 0660",
    ),
    (
        "PrivateDevices=",
        "it would hide /dev/nvidia*; DevicePolicy=closed is used instead",
    ),
    (
        "DeviceAllow=",
        "the NVIDIA device nodes are allowed (checked below)",
    ),
    ("RestrictAddressFamilies=~AF_UNIX", "logging to the journal"),
    ("RestrictAddressFamilies=~AF_(INET|INET6)", "the hub connection"),
    ("PrivateNetwork=", "the hub connection"),
    (
        "IPAddressDeny=",
        "localhost, and the hub once the drop-in names it (checked below)",
    ),
    (
        "ProcSubset=",
        "discovery reads /proc/cpuinfo, /proc/meminfo, /proc/sys/kernel",
    ),
    (
        "PrivateUsers=",
        "not used: device access in a user namespace is untested on GPU hosts",
    ),
];

fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd")
}

fn unit_path() -> PathBuf {
    systemd_dir().join("spokelet-node.service")
}

fn drop_in_path() -> PathBuf {
    systemd_dir().join("spokelet-node.service.d/hub-address.conf.example")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// `systemd-analyze`, or `None` after saying loudly why the test does not run.
fn systemd_analyze(test: &str) -> Option<Command> {
    let path = Path::new("/usr/bin/systemd-analyze");
    if path.is_file() {
        let mut cmd = Command::new(path);
        // ASCII marks (+/-) and no colours, whatever the caller's locale and terminal.
        cmd.env("LC_ALL", "C").env("SYSTEMD_COLORS", "0");
        return Some(cmd);
    }
    let message = format!(
        "systemd-analyze not found at {}: install Debian's `systemd` package (tests/env/install.sh does)",
        path.display()
    );
    if std::env::var_os("SPOKELET_TEST_REQUIRE_SYSTEMD").is_some_and(|v| v == "1") {
        panic!("{message}");
    }
    // Straight to the process's stderr: the test harness captures eprintln! of passing tests.
    let _ = writeln!(
        std::io::stderr().lock(),
        "\n*** SKIPPED {test}: {message}; the unit's confinement was NOT checked ***\n"
    );
    None
}

/// One row of `systemd-analyze security`'s table.
#[derive(Debug)]
struct Check {
    passed: bool,
    name: String,
    description: String,
    exposure: Option<f64>,
}

/// The outcome of `systemd-analyze security --offline=yes`.
#[derive(Debug)]
struct Security {
    checks: Vec<Check>,
    exposure: f64,
    rating: String,
    text: String,
}

impl Security {
    fn check(&self, name: &str) -> &Check {
        self.checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no {name} row in:\n{}", self.text))
    }
}

fn security(mut analyze: Command, unit: &Path) -> Security {
    let out = analyze
        .arg("security")
        .arg("--offline=yes")
        .arg(unit)
        .output()
        .expect("run systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "systemd-analyze security {} failed ({}): {}{text}",
        unit.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut checks = Vec::new();
    let mut overall = None;
    for line in text.lines() {
        if let Some((_, rest)) = line.split_once("Overall exposure level for ") {
            // "-> Overall exposure level for spokelet-node.service: 1.3 OK :-)"
            let (_, score) = rest.rsplit_once(": ").expect("a score after the unit name");
            let mut words = score.split_whitespace();
            let exposure: f64 = words
                .next()
                .and_then(|w| w.parse().ok())
                .expect("a numeric score");
            overall = Some((exposure, words.next().unwrap_or_default().to_owned()));
            continue;
        }
        let passed = match line.get(..2) {
            Some("+ ") => true,
            Some("- ") => false,
            _ => continue,
        };
        let rest = line[2..].trim();
        let (name, mut description) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        description = description.trim();
        let mut exposure = None;
        if !passed
            && let Some((text, last)) = description.rsplit_once(char::is_whitespace)
            && let Ok(value) = last.parse::<f64>()
        {
            exposure = Some(value);
            description = text.trim_end();
        }
        checks.push(Check {
            passed,
            name: name.to_owned(),
            description: description.to_owned(),
            exposure,
        });
    }
    let (exposure, rating) = overall.unwrap_or_else(|| panic!("no overall exposure level in:\n{text}"));
    assert!(
        checks.len() > 50,
        "too few rows parsed ({}) from:\n{text}",
        checks.len()
    );
    Security {
        checks,
        exposure,
        rating,
        text,
    }
}

/// A private copy of the unit (and, if given, the hub drop-in, installed under its real name),
/// with `edit` applied to the unit's text. systemd-analyze reads drop-ins from beside the unit.
fn copy_unit(edit: impl Fn(&str) -> String, with_drop_in: bool) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("spokelet-node.service");
    std::fs::write(&unit, edit(&read(&unit_path()))).unwrap();
    if with_drop_in {
        let d = dir.path().join("spokelet-node.service.d");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("hub-address.conf"), read(&drop_in_path())).unwrap();
    }
    (dir, unit)
}

fn without_directives(text: &str, keys: &[&str]) -> String {
    text.lines()
        .filter(|l| !keys.iter().any(|k| l.starts_with(&format!("{k}="))))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn security_exposure_is_low_and_the_hardening_checks_pass() {
    let Some(analyze) = systemd_analyze("security_exposure_is_low_and_the_hardening_checks_pass") else {
        return;
    };
    let s = security(analyze, &unit_path());
    assert!(
        s.exposure <= MAX_EXPOSURE && matches!(s.rating.as_str(), "OK" | "SAFE" | "PERFECT"),
        "exposure {} {} is above {MAX_EXPOSURE}:\n{}",
        s.exposure,
        s.rating,
        s.text
    );

    for prefix in MUST_PASS {
        let rows: Vec<&Check> = s.checks.iter().filter(|c| c.name.starts_with(prefix)).collect();
        assert!(!rows.is_empty(), "no {prefix} row in:\n{}", s.text);
        for row in rows {
            assert!(row.passed, "{} fails: {}", row.name, row.description);
        }
    }

    let accepted: Vec<&str> = ACCEPTED_EXPOSURES.iter().map(|(name, _)| *name).collect();
    for row in s.checks.iter().filter(|c| !c.passed) {
        assert!(
            accepted.contains(&row.name.as_str()),
            "{} fails ({}, exposure {:?}) and is not one of the accepted exposures; harden the unit or \
             add it to ACCEPTED_EXPOSURES with the reason",
            row.name,
            row.description,
            row.exposure
        );
    }

    // DevicePolicy=closed with an allow list: the device row names the list, and the list is
    // the NVIDIA nodes plus char-rtc:r, which ProtectClock=yes adds itself.
    let devices = s.check("DeviceAllow=");
    let list = devices
        .description
        .strip_prefix("Service has a device ACL with some special devices: ")
        .unwrap_or_else(|| panic!("no closed device policy: {}", devices.description));
    for entry in list.split_whitespace() {
        let (device, access) = entry.rsplit_once(':').unwrap();
        assert!(
            is_nvidia_device(device) || (device == "char-rtc" && access == "r"),
            "device {entry} is allowed"
        );
    }
    assert!(
        list.contains("/dev/nvidiactl:rw"),
        "NVML's control device is not allowed: {list}"
    );

    // Deny-all with localhost as the only exception until the operator's drop-in names the hub.
    let ip = s.check("IPAddressDeny=");
    assert_eq!(
        ip.description,
        "Service defines IP address allow list with only localhost entries"
    );
}

#[test]
fn the_hub_drop_in_opens_only_the_hub_and_verify_accepts_the_unit() {
    let test = "the_hub_drop_in_opens_only_the_hub_and_verify_accepts_the_unit";
    let Some(analyze) = systemd_analyze(test) else {
        return;
    };
    let (_dir, unit) = copy_unit(str::to_owned, true);
    let s = security(analyze, &unit);
    assert!(
        s.exposure <= MAX_EXPOSURE,
        "exposure {} with the drop-in:\n{}",
        s.exposure,
        s.text
    );
    let ip = s.check("IPAddressDeny=");
    assert_eq!(
        ip.description, "Service defines IP address allow list with non-localhost entries",
        "the drop-in did not add the hub's address"
    );

    // `verify` checks that ExecStart= is executable, and the binary is not installed here: the
    // copy runs /bin/true instead, the rest of the unit and the drop-in as shipped. Warnings
    // (an unknown or misspelt directive, a bad value) leave the exit status 0, so stderr must
    // be empty too.
    let (_dir, unit) = copy_unit(
        |text| text.replace("ExecStart=/usr/local/bin/spokelet-node ", "ExecStart=/bin/true "),
        true,
    );
    assert!(read(&unit).contains("ExecStart=/bin/true --hub-config"));
    let out = systemd_analyze(test)
        .unwrap()
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("run systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}

#[test]
fn removing_hardening_raises_the_exposure() {
    let test = "removing_hardening_raises_the_exposure";
    let Some(analyze) = systemd_analyze(test) else {
        return;
    };
    let shipped = security(analyze, &unit_path());
    let (_dir, unit) = copy_unit(
        |t| without_directives(t, &["DynamicUser", "ProtectSystem"]),
        false,
    );
    let weakened = security(systemd_analyze(test).unwrap(), &unit);
    assert!(
        weakened.exposure > shipped.exposure,
        "exposure {} without DynamicUser= and ProtectSystem=, {} with them",
        weakened.exposure,
        shipped.exposure
    );
    assert!(!weakened.check("User=/DynamicUser=").passed);
    assert!(!weakened.check("ProtectSystem=").passed);

    // And the device list: without DevicePolicy=closed there is no device ACL at all.
    let (_dir, unit) = copy_unit(|t| without_directives(t, &["DevicePolicy"]), false);
    let open = security(systemd_analyze(test).unwrap(), &unit);
    assert_eq!(
        open.check("DeviceAllow=").description,
        "Service has no device ACL"
    );
    assert!(open.exposure > shipped.exposure);
}

/// `[section]` → `(key, value)` in file order, for a systemd unit file: `#`/`;` comments,
/// blank lines, and lines continued with a trailing backslash.
fn parse_unit(text: &str) -> Vec<(String, String, String)> {
    let mut entries = Vec::new();
    let mut section = String::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';')) {
            continue;
        }
        if let Some(cont) = line.strip_suffix('\\') {
            pending.push_str(cont);
            pending.push(' ');
            continue;
        }
        let line = std::mem::take(&mut pending) + line;
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line}"));
        entries.push((section.clone(), key.trim().to_owned(), value.trim().to_owned()));
    }
    entries
}

fn values<'a>(entries: &'a [(String, String, String)], section: &str, key: &str) -> Vec<&'a str> {
    entries
        .iter()
        .filter(|(s, k, _)| s == section && k == key)
        .map(|(_, _, v)| v.as_str())
        .collect()
}

fn is_nvidia_device(device: &str) -> bool {
    device.starts_with("/dev/nvidia") || device.starts_with("char-nvidia")
}

#[test]
fn unit_file_allows_only_gpu_devices_and_no_capabilities() {
    let entries = parse_unit(&read(&unit_path()));
    let one = |key: &str| -> &str {
        match values(&entries, "Service", key)[..] {
            [v] => v,
            ref vs => panic!("{key}= is set {} times in [Service]: {vs:?}", vs.len()),
        }
    };

    let devices = values(&entries, "Service", "DeviceAllow");
    assert!(!devices.is_empty(), "no DeviceAllow=");
    for entry in &devices {
        let (device, access) = entry.split_once(' ').unwrap_or((entry, ""));
        assert!(
            is_nvidia_device(device),
            "DeviceAllow={entry}: not an NVIDIA device"
        );
        assert!(
            !access.is_empty() && access.chars().all(|c| c == 'r' || c == 'w'),
            "DeviceAllow={entry}: access must be r or rw (never m)"
        );
        assert!(
            !device.contains("uvm"),
            "DeviceAllow={entry}: NVML does not need nvidia-uvm"
        );
    }
    assert_eq!(one("DevicePolicy"), "closed");
    // PrivateDevices=yes would hide /dev/nvidia*; ProcSubset=pid would hide /proc/cpuinfo.
    assert!(
        values(&entries, "Service", "PrivateDevices")
            .iter()
            .all(|v| *v == "no")
    );
    assert!(values(&entries, "Service", "ProcSubset").is_empty());

    assert_eq!(one("CapabilityBoundingSet"), "", "the bounding set must be empty");
    assert_eq!(one("AmbientCapabilities"), "");
    assert_eq!(one("DynamicUser"), "yes");
    assert!(values(&entries, "Service", "User").is_empty());

    // The agent writes nothing: no writable path is handed to it.
    for key in [
        "StateDirectory",
        "ReadWritePaths",
        "CacheDirectory",
        "LogsDirectory",
    ] {
        assert!(values(&entries, "Service", key).is_empty(), "{key}= is set");
    }
    assert_eq!(one("ProtectSystem"), "strict");

    assert_eq!(one("IPAddressDeny"), "any");
    assert_eq!(values(&entries, "Service", "IPAddressAllow"), ["localhost"]);
    assert_eq!(one("RestrictAddressFamilies"), "AF_INET AF_INET6 AF_UNIX");

    assert_eq!(
        one("ExecStart"),
        "/usr/local/bin/spokelet-node --hub-config /etc/spokelet/hub.yaml"
    );
    assert_eq!(one("EnvironmentFile"), "-/etc/spokelet/node.env");
    assert_eq!(one("MemoryMax"), "64M");
    assert_eq!(one("TasksMax"), "32");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(values(&entries, "Install", "WantedBy"), ["multi-user.target"]);

    // The drop-in example: [Service] with IPAddressAllow= lines and nothing else, so that
    // installing it cannot loosen anything but the address list.
    let drop_in = parse_unit(&read(&drop_in_path()));
    assert!(!drop_in.is_empty());
    for (section, key, value) in &drop_in {
        assert_eq!(
            (section.as_str(), key.as_str()),
            ("Service", "IPAddressAllow"),
            "drop-in sets {key}={value}"
        );
        assert!(
            !value.is_empty() && value != "any",
            "IPAddressAllow={value} opens everything"
        );
    }
}

#[test]
fn unit_parser_reads_sections_continuations_and_empty_values() {
    let entries = parse_unit("# c\n[Service]\nA=\n; c\nB=x \\\n  y\n[Install]\nC = d\n");
    let owned = |s: &str, k: &str, v: &str| (s.to_owned(), k.to_owned(), v.to_owned());
    assert_eq!(
        entries,
        [
            owned("Service", "A", ""),
            owned("Service", "B", "x  y"),
            owned("Install", "C", "d")
        ]
    );
}
