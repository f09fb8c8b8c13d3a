//! Running things repeatedly and summarising the timings.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Median, 90th and 99th percentile of a set of timings.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub median: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Summary {
    pub fn of(mut samples: Vec<Duration>) -> Summary {
        assert!(!samples.is_empty(), "no samples to summarise");
        samples.sort();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Summary {
            median: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

/// Runs `ops` with at most `concurrency` at a time; returns their results in order.
pub fn concurrently<T: Send + 'static>(
    ops: Vec<Box<dyn FnOnce() -> anyhow::Result<T> + Send>>,
    concurrency: usize,
) -> anyhow::Result<Vec<T>> {
    let queue = std::sync::Arc::new(std::sync::Mutex::new(
        ops.into_iter().enumerate().collect::<Vec<_>>(),
    ));
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let queue = queue.clone();
            std::thread::spawn(move || -> anyhow::Result<Vec<(usize, T)>> {
                let mut done = Vec::new();
                loop {
                    let next = queue
                        .lock()
                        .map_err(|_| anyhow::anyhow!("queue poisoned"))?
                        .pop();
                    let Some((i, op)) = next else { return Ok(done) };
                    done.push((i, op()?));
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.join().map_err(|_| anyhow::anyhow!("worker panicked"))??);
    }
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, t)| t).collect())
}

/// Milliseconds with two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Runs `f` `warmup` times untimed, then `iterations` times timed.
pub fn measure(
    warmup: usize,
    iterations: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Summary> {
    for _ in 0..warmup {
        f()?;
    }
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let started = Instant::now();
        f()?;
        samples.push(started.elapsed());
    }
    Ok(Summary::of(samples))
}

/// Executes a CNI plugin the way a runtime does: a clean environment of
/// `env`, the config on stdin, stdout captured. Fails unless it exits 0.
pub fn exec_plugin(binary: &Path, env: &[(&str, &str)], stdin: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut child = Command::new(binary)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", binary.display()))?;
    child
        .stdin
        .take()
        .context("plugin stdin")?
        .write_all(stdin)
        .context("writing plugin stdin")?;
    let out = child.wait_with_output().context("waiting for the plugin")?;
    if !out.status.success() {
        bail!(
            "{} {:?} failed ({}): {}{}",
            binary.display(),
            env.first(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}
