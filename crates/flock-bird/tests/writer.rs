//! The writer: leading-edge reloads, coalescing, no rewrite of unchanged
//! text, retries; and the real BIRD reloading what it wrote.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flock_bird::{Birdc, RELOAD_INTERVAL, Reload, Writer};
use flock_testkit::{Bird, NetnsGuard};
use tokio::time::Instant;

#[derive(Clone, Default)]
struct Recorder {
    reloads: Arc<Mutex<Vec<(Instant, String)>>>,
    fail_next: Arc<Mutex<usize>>,
}

impl Reload for Recorder {
    fn check(&self, config: &Path) -> Result<(), String> {
        let text = std::fs::read_to_string(config).map_err(|e| e.to_string())?;
        if text.contains("refuse me") {
            Err("syntax error".into())
        } else {
            Ok(())
        }
    }

    fn reload(&self, config: &Path, _socket: &Path) -> Result<(), String> {
        let mut fail = self.fail_next.lock().expect("lock");
        if *fail > 0 {
            *fail -= 1;
            return Err("bird said no".into());
        }
        let text = std::fs::read_to_string(config).map_err(|e| e.to_string())?;
        self.reloads
            .lock()
            .expect("lock")
            .push((Instant::now(), text));
        Ok(())
    }
}

impl Recorder {
    fn texts(&self) -> Vec<String> {
        self.reloads
            .lock()
            .expect("lock")
            .iter()
            .map(|(_, t)| t.clone())
            .collect()
    }
}

async fn settle() {
    // Let the writer task and its blocking writes run.
    for _ in 0..20 {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn the_first_change_reloads_at_once_and_a_burst_coalesces_into_one_trailing_reload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rec = Recorder::default();
    let writer = Writer::start(
        dir.path().join("bird.conf"),
        dir.path().join("bird.ctl"),
        rec.clone(),
    );
    let start = Instant::now();
    writer.submit("a\n".into());
    settle().await;
    assert_eq!(rec.texts(), ["a\n"], "leading edge: no wait");
    assert!(rec.reloads.lock().expect("lock")[0].0 - start < RELOAD_INTERVAL);

    for t in ["b\n", "c\n", "d\n"] {
        writer.submit(t.into());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(RELOAD_INTERVAL * 2).await;
    settle().await;
    assert_eq!(
        rec.texts(),
        ["a\n", "d\n"],
        "one trailing reload with the newest text"
    );
    let times: Vec<Instant> = rec
        .reloads
        .lock()
        .expect("lock")
        .iter()
        .map(|(t, _)| *t)
        .collect();
    assert!(times[1] - times[0] >= RELOAD_INTERVAL);

    writer.submit("d\n".into());
    tokio::time::sleep(RELOAD_INTERVAL * 2).await;
    settle().await;
    assert_eq!(
        rec.texts().len(),
        2,
        "unchanged text is neither rewritten nor reloaded"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("bird.conf")).expect("file"),
        "d\n"
    );
    assert_eq!(writer.status().reloads, 2);
}

#[tokio::test(start_paused = true)]
async fn a_failed_reload_is_retried_and_reported_until_it_succeeds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rec = Recorder::default();
    *rec.fail_next.lock().expect("lock") = 2;
    let writer = Writer::start(
        dir.path().join("bird.conf"),
        dir.path().join("bird.ctl"),
        rec.clone(),
    );
    writer.submit("x\n".into());
    settle().await;
    let status = writer.status();
    assert_eq!(
        (status.failures, status.last_error.as_deref()),
        (1, Some("bird said no"))
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    settle().await;
    let status = writer.status();
    assert_eq!(
        (status.reloads, status.failures, status.last_error),
        (1, 2, None)
    );
    assert_eq!(rec.texts(), ["x\n"]);
}

#[tokio::test(start_paused = true)]
async fn a_restarted_writer_reloads_only_what_bird_has_not_confirmed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("bird.conf");
    let socket = dir.path().join("bird.ctl");
    let rec = Recorder::default();
    let writer = Writer::start(config.clone(), socket.clone(), rec.clone());
    writer.submit("a\n".into());
    settle().await;
    assert_eq!(rec.texts(), ["a\n"]);
    drop(writer);
    settle().await;
    // A restart with the same text: BIRD has it, nothing is reloaded.
    let writer = Writer::start(config.clone(), socket.clone(), rec.clone());
    writer.submit("a\n".into());
    settle().await;
    assert_eq!(rec.texts(), ["a\n"], "no reload for what BIRD confirmed");
    assert_eq!(writer.status().reloads, 0);
    drop(writer);
    settle().await;
    // A crash after the file was written, before BIRD confirmed it: the
    // file and the copy differ, so the next start loads it.
    std::fs::write(&config, "b\n").expect("write");
    let writer = Writer::start(config.clone(), socket.clone(), rec.clone());
    writer.submit("b\n".into());
    settle().await;
    assert_eq!(rec.texts(), ["a\n", "b\n"]);
    drop(writer);
    settle().await;
    // A reload that fails leaves the copy as it was: retried after a restart.
    *rec.fail_next.lock().expect("lock") = 1;
    let writer = Writer::start(config.clone(), socket.clone(), rec.clone());
    writer.submit("c\n".into());
    settle().await;
    assert_eq!(writer.status().failures, 1);
    drop(writer);
    settle().await;
    let writer = Writer::start(config, socket, rec.clone());
    writer.submit("c\n".into());
    settle().await;
    assert_eq!(rec.texts(), ["a\n", "b\n", "c\n"]);
}

fn birdc(socket: &Path, args: &[&str]) -> String {
    let out = Command::new("birdc")
        .arg("-s")
        .arg(socket)
        .args(args)
        .output()
        .expect("birdc");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_bird_loads_what_the_writer_installs() {
    let ns = NetnsGuard::new("bird");
    let dir = tempfile::tempdir().expect("tempdir");
    let config: PathBuf = dir.path().join("bird.conf");
    let socket = dir.path().join("bird.ctl");
    std::fs::write(
        &config,
        "log stderr all;\nrouter id 198.18.255.1;\nprotocol device {}\n",
    )
    .expect("bootstrap");
    let bird = Bird::start(ns.name(), &config, &socket);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !birdc(&socket, &["show", "status"]).contains("Daemon is up") {
        assert!(std::time::Instant::now() < deadline, "bird never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    let writer = Writer::start(config.clone(), socket.clone(), Birdc);
    let rendered = "log stderr all;\nrouter id 198.18.255.1;\nprotocol device {}\nprotocol static static4 {\n  ipv4;\n  route 198.18.0.0/24 blackhole;\n}\n";
    writer.submit(rendered.into());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let routes = birdc(&socket, &["show", "route"]);
        if routes.contains("198.18.0.0/24") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "BIRD never loaded the new config: {routes} {:?}",
            writer.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(writer.status().reloads, 1);
    // A config BIRD refuses is reported and never replaces the good file;
    // BIRD keeps the good one loaded.
    writer.submit("this is not bird syntax\n".into());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while writer.status().refused == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "refusal never reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        writer
            .status()
            .last_error
            .is_some_and(|e| e.contains("bird -p")),
        "{:?}",
        writer.status()
    );
    assert_eq!(
        std::fs::read_to_string(&config).expect("file"),
        rendered,
        "the file on disk is the last good one"
    );
    assert!(
        !config.with_extension("conf.tmp").exists(),
        "no temp file left"
    );
    assert!(
        birdc(&socket, &["show", "route"]).contains("198.18.0.0/24"),
        "the last good config stays loaded"
    );
    drop(bird);
    drop(ns);
}

#[tokio::test(start_paused = true)]
async fn a_refused_text_keeps_the_good_file_and_is_not_retried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("bird.conf");
    let rec = Recorder::default();
    let writer = Writer::start(config.clone(), dir.path().join("bird.ctl"), rec.clone());
    writer.submit("good\n".into());
    settle().await;
    writer.submit("refuse me\n".into());
    tokio::time::sleep(RELOAD_INTERVAL * 10).await;
    settle().await;
    let status = writer.status();
    assert_eq!((status.reloads, status.refused, status.failures), (1, 1, 0));
    assert_eq!(std::fs::read_to_string(&config).expect("file"), "good\n");
    assert_eq!(rec.texts(), ["good\n"], "nothing refused is loaded");
    writer.submit("better\n".into());
    tokio::time::sleep(RELOAD_INTERVAL * 2).await;
    settle().await;
    assert_eq!(std::fs::read_to_string(&config).expect("file"), "better\n");
    assert_eq!(writer.status().last_error, None);
}
