//! `optimsyn train` then `optimsyn synthesize` on the bundled demo, killed with SIGKILL at random
//! moments and rerun with the same command until each finishes, end with exactly the files of a
//! run that was never interrupted: the same samples (none lost, none duplicated), the same
//! influence log, GRPO metrics, warm-up and policy adapters, and the same final dataset.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn demo_config() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("demo/demo.toml")
}

/// The demo profile, shortened: 3 GRPO steps of 6 prompts × G 2, from only ~5 training prompts
/// (`train_fraction` 0.1), so every step holds some prompt twice (the batch spans an epoch).
fn command(stage: &str, out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_optimsyn"));
    c.arg(stage).arg("--config").arg(demo_config());
    for s in [
        format!("out={}", out.display()),
        "steps=3".into(),
        "data.train_fraction=0.1".into(),
        "grpo.group_size=2".into(),
        "grpo.prompts_per_step=6".into(),
        "grpo.mini_batch_prompts=6".into(),
        "grpo.micro_batch_size=12".into(),
    ] {
        c.arg("--set").arg(s);
    }
    c.env("OMP_WAIT_POLICY", "PASSIVE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

fn run_to_end(stage: &str, out: &Path) -> Duration {
    let t = Instant::now();
    let o = command(stage, out).output().expect("run optimsyn");
    assert!(
        o.status.success(),
        "{stage} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    t.elapsed()
}

/// A small seeded generator for the kill times (xorshift64*): the test prints its seed.
struct Lcg(u64);

impl Lcg {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Runs `stage` with up to `kills` SIGKILLs at random moments of its expected duration, then lets
/// it finish. Returns how many times it was really killed.
fn run_with_kills(
    stage: &str,
    out: &Path,
    expected: Duration,
    kills: usize,
    rng: &mut Lcg,
) -> usize {
    let mut killed = 0;
    for _ in 0..kills {
        // Within the first half of a full run's time, so a rerun (which redoes its start-up) is
        // usually interrupted again.
        let at = expected.mul_f64(0.1 + 0.4 * rng.unit());
        let mut child = command(stage, out).spawn().expect("spawn optimsyn");
        let start = Instant::now();
        let mut finished = None;
        while start.elapsed() < at {
            if let Some(status) = child.try_wait().expect("wait") {
                finished = Some(status);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        match finished {
            Some(_) => {
                let status = child.wait().expect("wait"); // already reaped: returns at once
                assert!(
                    status.success(),
                    "{stage} failed on its own after {killed} kills"
                );
                return killed;
            }
            None => {
                child.kill().expect("SIGKILL");
                let _ = child.wait();
                killed += 1;
            }
        }
    }
    run_to_end(stage, out);
    killed
}

fn rows(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display())))
        .collect()
}

/// Rows keyed by id; a duplicated id fails.
fn by_id(path: &Path) -> BTreeMap<String, Value> {
    let mut m = BTreeMap::new();
    for r in rows(path) {
        let id = r["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: a row without id", path.display()))
            .to_string();
        assert!(
            m.insert(id.clone(), r).is_none(),
            "{}: {id} twice",
            path.display()
        );
    }
    m
}

fn without_time(mut rows: Vec<Value>) -> Vec<Value> {
    for r in &mut rows {
        if let Some(o) = r.as_object_mut() {
            // Wall-clock fields (GRPO's `time`, SFT's `seconds`).
            o.remove("time");
            o.remove("seconds");
        }
    }
    rows
}

fn files_under(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(suffix) {
                out.push(p.strip_prefix(dir).expect("under").to_path_buf());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn train_and_synthesize_killed_at_random_moments_end_like_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let t_train = run_to_end("train", &a);
    let t_synth = run_to_end("synthesize", &a);

    // `OPTIMSYN_KILL_SEED=N` tries other kill times.
    let seed = std::env::var("OPTIMSYN_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0001_u64);
    eprintln!(
        "kill times from seed {seed:#x}; uninterrupted: train {t_train:?}, synthesize {t_synth:?}"
    );
    let mut rng = Lcg(seed);
    let k1 = run_with_kills("train", &b, t_train, 4, &mut rng);
    let k2 = run_with_kills("synthesize", &b, t_synth, 2, &mut rng);
    eprintln!("killed train {k1} times, synthesize {k2} times");
    // Later kills may come after a rerun has already finished (it resumed past most of the work);
    // the first comes within the first half of a full run, so it lands.
    assert!(k1 >= 1, "the test should really interrupt training");

    // Every sample file: same rows, none lost or duplicated.
    let jsonl = files_under(&a, ".jsonl");
    assert!(
        jsonl.iter().any(|p| p.starts_with("rl/samples")),
        "{jsonl:?}"
    );
    assert!(
        jsonl
            .iter()
            .any(|p| p.to_string_lossy().starts_with("dataset-")),
        "{jsonl:?}"
    );
    assert_eq!(jsonl, files_under(&b, ".jsonl"), "the same files");
    for rel in &jsonl {
        let name = rel.to_string_lossy();
        if name.ends_with("metrics.jsonl") {
            assert_eq!(
                without_time(rows(&a.join(rel))),
                without_time(rows(&b.join(rel))),
                "{name}"
            );
        } else if name == "rl/influence.jsonl" || name == "prompts.jsonl" {
            assert_eq!(rows(&a.join(rel)), rows(&b.join(rel)), "{name}");
        } else {
            assert_eq!(by_id(&a.join(rel)), by_id(&b.join(rel)), "{name}");
        }
    }
    // The trained weights, bit for bit.
    let adapters = files_under(&a, "adapter_model.safetensors");
    assert!(adapters.iter().any(|p| p.starts_with("rl")), "{adapters:?}");
    for rel in adapters {
        let (x, y) = (std::fs::read(a.join(&rel)), std::fs::read(b.join(&rel)));
        assert!(
            x.expect("a") == y.unwrap_or_else(|e| panic!("{}: {e}", rel.display())),
            "{} differs",
            rel.display()
        );
    }
}
