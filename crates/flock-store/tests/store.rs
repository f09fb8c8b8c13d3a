//! The store's contract: durable round trips, and refusal (never silent
//! emptiness) for files it cannot trust.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use flock_store::{AllocState, Allocation, FILE_NAME, JOURNAL_NAME, Store, StoreError};

fn entry(id: &str, n: u8) -> Allocation {
    Allocation {
        container_id: id.into(),
        ifname: "eth0".into(),
        namespace: "shop".into(),
        pod: format!("web-{n}"),
        pod_uid: format!("uid-{n}"),
        host_iface: String::new(),
        ip6: Some(format!("2001:db8:0:1::{n:x}").parse().expect("v6")),
        ip4: Some(Ipv4Addr::new(198, 18, 0, n)),
        anycast: vec!["2001:db8:ffff::1".parse().expect("any")],
        addresses: vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, n))],
        netns: String::new(),
        netns_inode: None,
        mtu: None,
        state: AllocState::Pending,
        allocated_at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_100_000_123),
    }
}

#[test]
fn entries_survive_a_reopen_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(dir.path()).expect("empty store");
    assert!(store.is_empty());
    store.upsert(entry("c1", 2)).expect("write");
    let mut committed = entry("c1", 2);
    committed.state = AllocState::Committed;
    store.upsert(committed.clone()).expect("commit");
    store.upsert(entry("c2", 3)).expect("write");

    // From the journal alone…
    let reopened = Store::open(dir.path()).expect("reopen");
    assert_eq!(reopened.len(), 2);
    assert_eq!(reopened.get("c1", "eth0"), Some(&committed));
    assert_eq!(reopened.get("c2", "eth0"), Some(&entry("c2", 3)));
    // …and from the snapshot once compacted.
    let mut reopened = reopened;
    reopened.compact().expect("compact");
    assert_eq!(
        std::fs::metadata(dir.path().join(JOURNAL_NAME))
            .expect("journal")
            .len(),
        0
    );
    let again = Store::open(dir.path()).expect("reopen");
    assert_eq!(again.get("c1", "eth0"), Some(&committed));
    let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).expect("file");
    assert!(text.contains("\"schemaVersion\": 2"), "{text}");
    assert!(
        text.contains("\"allocatedAt\": \"2025-11-25T19:46:40.123Z\""),
        "{text}"
    );
    assert!(text.contains("\"state\": \"committed\""), "{text}");
}

#[test]
fn remove_is_durable_and_idempotent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(dir.path()).expect("open");
    store.upsert(entry("c1", 2)).expect("write");
    assert_eq!(
        store
            .remove("c1", "eth0", SystemTime::now())
            .expect("remove"),
        Some(entry("c1", 2))
    );
    assert_eq!(
        store
            .remove("c1", "eth0", SystemTime::now())
            .expect("again"),
        None
    );
    assert_eq!(
        store
            .remove("never", "eth0", SystemTime::now())
            .expect("unknown"),
        None
    );
    assert!(Store::open(dir.path()).expect("reopen").is_empty());
}

fn open_err(dir: &std::path::Path) -> StoreError {
    Store::open(dir).expect_err("must refuse")
}

#[test]
fn a_corrupt_file_is_refused_by_name_and_left_in_place() {
    let cases: &[&[u8]] = &[
        b"",
        b"{\"schemaVersion\":1,\"allocations\":[",
        b"null",
        b"{\"allocations\":[]}",
        b"{\"schemaVersion\":1,\"allocations\":[{\"containerId\":\"c\"}]}",
        b"{\"schemaVersion\":0,\"allocations\":[]}",
    ];
    for bytes in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, bytes).expect("seed");
        let err = open_err(dir.path());
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert_eq!(
            std::fs::read(&path).expect("still there"),
            *bytes,
            "left untouched"
        );
    }
}

#[test]
fn duplicate_entries_newer_schemas_and_unreadable_files_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(dir.path()).expect("open");
    store.upsert(entry("c1", 2)).expect("write");
    store.compact().expect("compact");
    drop(store);
    let path = dir.path().join(FILE_NAME);
    let text = std::fs::read_to_string(&path).expect("file");
    let doubled = text.replacen("\"allocations\": [", "\"allocations\": [\n", 1);
    let one = serde_json::to_string(&entry("c1", 2)).expect("json");
    std::fs::write(
        &path,
        doubled.replacen(
            "\"allocations\": [\n",
            &format!("\"allocations\": [{one},"),
            1,
        ),
    )
    .expect("dup");
    let err = open_err(dir.path());
    assert!(err.to_string().contains("appears twice"), "{err}");

    std::fs::write(
        &path,
        b"{\"schemaVersion\":9,\"allocations\":[],\"future\":true}",
    )
    .expect("newer");
    assert!(matches!(
        open_err(dir.path()),
        StoreError::NewerSchema { found: 9, .. }
    ));

    std::fs::remove_file(&path).expect("rm");
    std::fs::create_dir(&path).expect("a directory where the file should be");
    assert!(matches!(open_err(dir.path()), StoreError::Read { .. }));
}

#[test]
fn a_leftover_temp_file_is_ignored_and_a_failed_compaction_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(dir.path()).expect("open");
    store.upsert(entry("c1", 2)).expect("write");
    store.compact().expect("compact");
    let tmp = dir.path().join("allocations.json.tmp");
    std::fs::write(&tmp, b"half a write").expect("leftover");
    let mut store = Store::open(dir.path()).expect("leftover ignored");
    assert!(!tmp.exists(), "leftover removed");

    // The next snapshot cannot be written: its temp path is taken by a directory.
    std::fs::create_dir(&tmp).expect("block");
    store
        .upsert(entry("c2", 3))
        .expect("the change itself is journalled");
    assert!(matches!(store.compact(), Err(StoreError::Write { .. })));
    std::fs::remove_dir(&tmp).expect("unblock");
    let reopened = Store::open(dir.path()).expect("reopen");
    assert_eq!(reopened.len(), 2, "nothing lost");
}

#[test]
fn the_journal_stays_short_and_a_torn_tail_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(dir.path()).expect("open");
    for i in 0..300u32 {
        store
            .upsert(entry(&format!("c{}", i % 10), (i % 200) as u8))
            .expect("write");
        store.compact_if_due().expect("compaction");
    }
    let journal = dir.path().join(JOURNAL_NAME);
    let lines = std::fs::read_to_string(&journal)
        .expect("journal")
        .lines()
        .count();
    assert!(lines < 128, "compacted along the way: {lines} records left");
    drop(store);
    // A crash mid-append leaves half a line: it was never acknowledged.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&journal)
        .expect("journal");
    std::io::Write::write_all(&mut f, b"{\"upsert\":{\"containerId\":\"c99\"").expect("torn");
    drop(f);
    let store = Store::open(dir.path()).expect("torn tail dropped");
    assert_eq!(store.len(), 10);
    assert!(store.get("c99", "eth0").is_none());
    // A bad line before the end is corruption, and is refused.
    std::fs::write(&journal, b"garbage\n{}\n").expect("corrupt");
    let err = Store::open(dir.path()).expect_err("corrupt journal");
    assert!(err.to_string().contains(JOURNAL_NAME), "{err}");
}

#[test]
fn release_times_survive_reopen_and_compaction_and_a_reused_address_leaves_the_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(dir.path()).expect("open");
    store.upsert(entry("c1", 2)).expect("write");
    store.upsert(entry("c2", 3)).expect("write");
    let t1 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let t2 = t1 + Duration::from_secs(5);
    store.remove("c1", "eth0", t1).expect("remove c1");
    store.remove("c2", "eth0", t2).expect("remove c2");
    let history = |s: &Store| s.released().collect::<Vec<_>>();
    let want = vec![
        (IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)), t1),
        (IpAddr::V4(Ipv4Addr::new(198, 18, 0, 3)), t2),
        ("2001:db8:0:1::2".parse().expect("v6"), t1),
        ("2001:db8:0:1::3".parse().expect("v6"), t2),
    ];
    assert_eq!(history(&Store::open(dir.path()).expect("reopen")), want);
    let mut store = Store::open(dir.path()).expect("reopen");
    store.compact().expect("compact");
    assert_eq!(history(&Store::open(dir.path()).expect("reopen")), want);

    // Handing 198.18.0.2 and 2001:db8:0:1::2 out again takes them off the history.
    store.upsert(entry("c9", 2)).expect("reuse");
    let left = history(&Store::open(dir.path()).expect("reopen"));
    assert_eq!(left, vec![want[1], want[3]]);
}

#[test]
fn a_version_1_file_loads_and_releasing_entries_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join(FILE_NAME),
        r#"{"schemaVersion": 1, "allocations": [{"containerId": "c1", "ifname": "eth0",
            "namespace": "shop", "pod": "web", "ip4": "198.18.0.2", "state": "committed",
            "allocatedAt": "2025-11-25T19:46:40.123Z"}]}"#,
    )
    .expect("v1 file");
    let mut store = Store::open(dir.path()).expect("a version 1 file loads");
    let mut e = store.get("c1", "eth0").expect("entry").clone();
    assert_eq!(e.host_iface, "", "older entries name no host interface");
    e.state = AllocState::Releasing;
    store.upsert(e.clone()).expect("releasing");
    store.compact().expect("compact");
    assert_eq!(
        Store::open(dir.path()).expect("reopen").get("c1", "eth0"),
        Some(&e)
    );
}

#[test]
fn writes_go_on_while_a_snapshot_is_written_and_none_is_lost_whenever_a_crash_comes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(dir.path()).expect("empty store");
    for n in 1..=5 {
        store.upsert(entry(&format!("c{n}"), n)).expect("write");
    }
    let compaction = store
        .begin_compaction()
        .expect("begin")
        .expect("none in flight");
    assert!(
        store.begin_compaction().expect("begin").is_none(),
        "one at a time"
    );
    // Written while the snapshot is on its way (its thread, in the agent).
    store.upsert(entry("c6", 6)).expect("write meanwhile");
    store
        .remove(
            "c1",
            "eth0",
            SystemTime::UNIX_EPOCH + Duration::from_secs(7),
        )
        .expect("remove meanwhile");
    let expected: Vec<Allocation> = store.iter().cloned().collect();
    let written = compaction.write();
    // A crash now: the new snapshot and the whole journal.
    let crashed = Store::open(dir.path()).expect("reopen");
    assert_eq!(crashed.iter().cloned().collect::<Vec<_>>(), expected);
    store.finish_compaction(written).expect("finish");
    let lines = std::fs::read_to_string(dir.path().join(JOURNAL_NAME)).expect("journal");
    assert_eq!(
        lines.lines().count(),
        2,
        "only what came after the snapshot: {lines}"
    );
    store.upsert(entry("c7", 7)).expect("write after");
    let reopened = Store::open(dir.path()).expect("reopen");
    let mut want = expected;
    want.push(entry("c7", 7));
    assert_eq!(reopened.iter().cloned().collect::<Vec<_>>(), want);
    assert!(
        reopened
            .released()
            .any(|(ip, _)| ip == IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1))),
        "c1's release time kept"
    );
}
