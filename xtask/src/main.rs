//! Project tasks, run as `cargo xtask <task>`.
//!
//! Every task that builds Rust code first makes sure libtorch is installed: tch 0.26 needs
//! PyTorch 2.13.0 exactly, which we take from the PyPI wheel (tch's own download host is not
//! reachable from most build machines). The wheel goes into a Python virtual environment in a
//! cache outside the checkout (`$OPTIMSYN_CACHE`, else `$XDG_CACHE_HOME/optimsyn`, else
//! `~/.cache/optimsyn`), shared by every clone on the machine. The same environment holds the
//! Python packages that tests call, so tests never depend on what a machine happens to have.
//!
//! Tasks:
//! - `test [ARGS]`: the whole test suite (unit, integration, doc tests; examples run, benches in
//!   test mode), then `cargo doc` with warnings as errors, then `downstream`.
//! - `downstream`: builds and runs a throwaway project outside the workspace that depends on
//!   optimsyn-influence and optimsyn-rl-grpo by path, set up exactly as the README's library
//!   section says (its manifest and build script are taken from the README itself).
//! - `demo [ARGS]`: `optimsyn demo`, the embedded end-to-end run.
//! - `bench [--quick] [ARGS]`: every benchmark (`cargo bench -p optimsyn-examples`); `--quick`
//!   runs each once on tiny shapes, proving they work without judging speed.
//! - `env`: shell `export` lines for running plain `cargo` with the same libtorch.
//! - `bootstrap`: only install (idempotent).
//! - `fixtures`: regenerate the committed parity fixtures with transformers (needs PyPI).

use std::env;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

/// Pinned by tch 0.26.0 (torch-sys `TORCH_VERSION`).
const TORCH_VERSION: &str = "2.13.0";

fn main() -> ExitCode {
    let mut args = env::args().skip(1);
    let task = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    let result = match task.as_str() {
        "test" => test(&rest),
        "demo" => demo(&rest),
        "bench" => bench(&rest),
        "downstream" => downstream(),
        "env" => print_env(),
        "bootstrap" => bootstrap().map(|b| {
            eprintln!("libtorch: {}", b.libtorch.display());
            eprintln!("python:   {}", b.python.display());
        }),
        "fixtures" => fixtures(&rest),
        _ => {
            eprintln!(
                "usage: cargo xtask <test|demo|bench|downstream|env|bootstrap|fixtures> [ARGS]\n\n\
                 test       run the whole test suite (installs libtorch first)\n\
                 demo       run `optimsyn demo` (installs libtorch first)\n\
                 bench      run every benchmark; --quick: each once on tiny shapes\n\
                 downstream build and run a project outside the workspace that uses the crates\n\
                 env        print `export` lines to use plain cargo with the same libtorch\n\
                 bootstrap  only install libtorch and the test Python packages\n\
                 fixtures   regenerate parity fixtures with transformers (needs PyPI)"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T> = std::result::Result<T, String>;

fn root() -> PathBuf {
    // xtask lives one folder below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = env::var_os("OPTIMSYN_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("optimsyn"));
    }
    env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache").join("optimsyn"))
        .ok_or_else(|| "set OPTIMSYN_CACHE (no HOME to put the libtorch cache under)".to_string())
}

/// What the build needs to find libtorch and the test Python.
struct Bootstrap {
    libtorch: PathBuf,
    python: PathBuf,
}

impl Bootstrap {
    fn envs(&self) -> Vec<(&'static str, OsString)> {
        vec![
            ("LIBTORCH", self.libtorch.clone().into_os_string()),
            ("OPTIMSYN_PYTHON", self.python.clone().into_os_string()),
        ]
    }
}

fn bootstrap() -> Result<Bootstrap> {
    // A user-provided libtorch wins; tests that call Python then use OPTIMSYN_PYTHON or python3.
    if let Some(lt) = env::var_os("LIBTORCH") {
        let python = env::var_os("OPTIMSYN_PYTHON").unwrap_or_else(|| "python3".into());
        return Ok(Bootstrap {
            libtorch: lt.into(),
            python: python.into(),
        });
    }
    let requirements = root().join("python").join("requirements.txt");
    let reqs = fs::read_to_string(&requirements)
        .map_err(|e| format!("cannot read {}: {e}", requirements.display()))?;
    let venv = cache_dir()?.join(format!("torch-{TORCH_VERSION}"));
    let python = venv.join("bin").join("python");
    let stamp = venv.join(".optimsyn-installed");
    // Another build of the same torch version (CPU-only, an older CUDA) from a package index the
    // user names; the stamp includes it, so switching builds reinstalls.
    let torch_index = env::var("OPTIMSYN_TORCH_INDEX")
        .ok()
        .filter(|s| !s.is_empty());
    let stamped = match &torch_index {
        Some(index) => format!("{reqs}\n{index}"),
        None => reqs.clone(),
    };
    let want = format!("{:016x}", fnv1a(stamped.as_bytes()));
    if fs::read_to_string(&stamp).ok().as_deref() != Some(want.as_str()) {
        eprintln!(
            "optimsyn bootstrap: installing torch=={TORCH_VERSION} and the test Python packages \
             into {} (once per machine, ~5 GB, a few minutes)",
            venv.display()
        );
        if !python.exists() {
            fs::create_dir_all(&venv)
                .map_err(|e| format!("cannot create {}: {e}", venv.display()))?;
            run(
                Command::new(python3()?).args(["-m", "venv"]).arg(&venv),
                "python3 -m venv",
            )?;
        }
        if let Some(index) = &torch_index {
            eprintln!(
                "optimsyn bootstrap: torch=={TORCH_VERSION} from {index} (OPTIMSYN_TORCH_INDEX)"
            );
            let spec = format!("torch=={TORCH_VERSION}");
            pip_install(
                &python,
                &[
                    "--force-reinstall".as_ref(),
                    "--index-url".as_ref(),
                    index.as_ref(),
                    spec.as_ref(),
                ],
            )?;
        }
        pip_install(&python, &["-r".as_ref(), requirements.as_os_str()])?;
        fs::write(&stamp, &want).map_err(|e| format!("cannot write {}: {e}", stamp.display()))?;
    }
    let libtorch = find_torch(&venv)?;
    Ok(Bootstrap { libtorch, python })
}

fn python3() -> Result<PathBuf> {
    for name in ["python3", "python"] {
        if Command::new(name)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            return Ok(name.into());
        }
    }
    Err("no python3 on PATH: install Python 3.10+ (with venv and pip) to bootstrap libtorch".into())
}

fn pip_install(python: &Path, args: &[&std::ffi::OsStr]) -> Result<()> {
    let out = Command::new(python)
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    io::stderr().write_all(&out.stdout).ok();
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    let offline = [
        "NewConnectionError",
        "Temporary failure in name resolution",
        "Network is unreachable",
        "ConnectTimeout",
        "ReadTimeout",
        "Max retries exceeded",
        "No matching distribution found",
    ]
    .iter()
    .any(|m| err.contains(m));
    if offline {
        Err(format!(
            "cannot reach the Python package index to install torch=={TORCH_VERSION}. \
             Connect this machine to PyPI (or a mirror via PIP_INDEX_URL) and run again, or set \
             LIBTORCH to an existing libtorch {TORCH_VERSION} folder (one with include/ and lib/)."
        ))
    } else {
        Err(format!(
            "pip install failed ({}); see its output above",
            out.status
        ))
    }
}

fn find_torch(venv: &Path) -> Result<PathBuf> {
    let lib = venv.join("lib");
    let entries = fs::read_dir(&lib).map_err(|e| format!("cannot list {}: {e}", lib.display()))?;
    for entry in entries.flatten() {
        let torch = entry.path().join("site-packages").join("torch");
        if torch.join("lib").join("libtorch_cpu.so").exists()
            || torch.join("lib").join("libtorch_cpu.dylib").exists()
        {
            return Ok(torch);
        }
    }
    Err(format!(
        "torch is not installed under {}; delete that folder and run again",
        venv.display()
    ))
}

/// A stable, dependency-free hash for the install stamp.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd
        .status()
        .map_err(|e| format!("cannot start {what}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed ({status})"))
    }
}

fn cargo(b: &Bootstrap) -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root()).envs(b.envs());
    // torch-sys reruns on these; keeping them out makes every invocation see the same environment.
    for v in [
        "LIBTORCH_USE_PYTORCH",
        "LIBTORCH_INCLUDE",
        "LIBTORCH_LIB",
        "LIBTORCH_CXX11_ABI",
        "LIBTORCH_STATIC",
    ] {
        cmd.env_remove(v);
    }
    cmd
}

fn test(args: &[String]) -> Result<()> {
    let b = bootstrap()?;
    // One dev build serves everything: unit and integration tests, examples, and criterion benches
    // run once each in test mode; then the doc tests.
    run(
        cargo(&b)
            .args(["test", "--workspace", "--all-targets"])
            .args(args),
        "cargo test",
    )?;
    run(
        cargo(&b).args(["test", "--workspace", "--doc"]).args(args),
        "cargo test --doc",
    )?;
    run(
        cargo(&b)
            .args(["doc", "--workspace", "--no-deps"])
            .env("RUSTDOCFLAGS", "-D warnings"),
        "cargo doc",
    )?;
    // Not a `cargo test` test: cargo holds the target directory's lock while tests run, so a
    // nested build sharing it would wait forever.
    downstream_with(&b)
}

fn demo(args: &[String]) -> Result<()> {
    let b = bootstrap()?;
    run(
        cargo(&b)
            .args(["run", "--release", "--package", "optimsyn", "--", "demo"])
            .args(args),
        "optimsyn demo",
    )
}

fn bench(args: &[String]) -> Result<()> {
    let b = bootstrap()?;
    let quick = args.iter().any(|a| a == "--quick");
    let rest: Vec<&String> = args.iter().filter(|a| *a != "--quick").collect();
    let mut cmd = cargo(&b);
    cmd.args(["bench", "-p", "optimsyn-examples"]).args(&rest);
    if quick {
        // Criterion's test mode (each benchmark once); the other benches honour the flag too.
        if !rest.iter().any(|a| *a == "--") {
            cmd.arg("--");
        }
        cmd.arg("--test");
    }
    run(&mut cmd, "cargo bench")
}

fn downstream() -> Result<()> {
    downstream_with(&bootstrap()?)
}

/// The fenced block of `lang` after `heading` in the README.
fn readme_block(readme: &str, heading: &str, lang: &str) -> Result<String> {
    let section = readme
        .split_once(heading)
        .map(|(_, rest)| rest)
        .ok_or_else(|| format!("README.md has no `{heading}` section"))?;
    let fence = format!("```{lang}\n");
    let start = section
        .find(&fence)
        .ok_or_else(|| format!("README.md `{heading}`: no ```{lang} block"))?
        + fence.len();
    let len = section[start..]
        .find("```")
        .ok_or_else(|| format!("README.md `{heading}`: unterminated ```{lang} block"))?;
    Ok(section[start..start + len].to_string())
}

/// The downstream project's code: a few lines of optimsyn-influence's and optimsyn-rl-grpo's
/// public API.
const DOWNSTREAM_MAIN: &str = r#"use optimsyn_influence::{Projector, ProjectorKind, pearson};
use optimsyn_rl_grpo::{CategoricalPolicy, GrpoConfig, Prompt, Reference, Trainer, reward_fn};
use tch::{Device, Kind, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A seeded sparse JL projection keeps inner products.
    let (p, k) = (4096, 2048);
    let proj = Projector::new(ProjectorKind::Sjlt { k, s: 4, seed: 7 }, p, 0)?;
    tch::manual_seed(0);
    let x = Tensor::randn([6, p as i64], (Kind::Float, Device::Cpu));
    let y = proj.project(&x)?;
    let gram = |t: &Tensor| -> Vec<f64> {
        Vec::<f64>::try_from(t.matmul(&t.tr()).flatten(0, -1).to_kind(Kind::Double)).unwrap_or_default()
    };
    let r = pearson(&gram(&x), &gram(&y));
    assert!(r > 0.99, "projection lost the inner products: Pearson {r}");

    // GRPO teaches a toy policy to emit token 3.
    let policy = CategoricalPolicy::new(4, 8, 0.0, 0, Kind::Float)?;
    let prompts: Vec<Prompt> = (0..8).map(|i| Prompt::new(format!("p{i}"), vec![1, 2])).collect();
    let mut config = GrpoConfig::default();
    config.group_size = 8;
    config.prompts_per_step = 4;
    config.mini_batch_prompts = 4;
    config.rollout.temperature = 1.0;
    config.loss.kl_coef = 0.0;
    config.optimizer.lr = 0.1;
    let mut trainer = Trainer::new(config, policy, Reference::None, prompts)?;
    let mut reward = reward_fn(|batch| {
        batch.rollouts.iter()
            .map(|r| r.completion.tokens.iter().filter(|&&t| t == 3).count() as f64)
            .collect()
    });
    let metrics = trainer.train(&mut reward, 20)?;
    let (first, last) = (&metrics[0], &metrics[metrics.len() - 1]);
    assert!(last.reward.mean > first.reward.mean + 1.0, "{} -> {}", first.reward.mean, last.reward.mean);
    println!("downstream ok: projection Pearson {r:.4}; GRPO reward {:.2} -> {:.2}", first.reward.mean, last.reward.mean);
    Ok(())
}
"#;

fn downstream_with(b: &Bootstrap) -> Result<()> {
    let root = root();
    let readme_path = root.join("README.md");
    let readme = fs::read_to_string(&readme_path)
        .map_err(|e| format!("cannot read {}: {e}", readme_path.display()))?;
    let heading = "## Using the crates from another project";
    // The README's paths are written for a checkout beside the project (`../optimsyn/crates/…`).
    let manifest = readme_block(&readme, heading, "toml")?
        .replace("../optimsyn/", &format!("{}/", root.display()));
    let build_rs = readme_block(&readme, heading, "rust,ignore")?;
    let dir = env::temp_dir().join(format!("optimsyn-downstream-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("src"))
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        fs::write(&p, text).map_err(|e| format!("cannot write {}: {e}", p.display()))
    };
    write(
        "Cargo.toml",
        &format!(
            "[package]\nname = \"downstream-check\"\nversion = \"0.0.0\"\nedition = \"2024\"\npublish = false\n\n\
             {manifest}\n# Not part of any workspace above this folder.\n[workspace]\n"
        ),
    )?;
    write("build.rs", &build_rs)?;
    write("src/main.rs", DOWNSTREAM_MAIN)?;
    // The workspace's lockfile and target folder: the same dependency versions, already built.
    fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock"))
        .map_err(|e| format!("cannot copy Cargo.lock: {e}"))?;
    let target = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    eprintln!(
        "downstream: building {} against {}",
        dir.display(),
        root.display()
    );
    let result = run(
        cargo(b)
            .current_dir(&dir)
            .env("CARGO_TARGET_DIR", &target)
            .args(["run", "--quiet"]),
        "downstream project",
    );
    if result.is_ok() {
        let _ = fs::remove_dir_all(&dir);
    } else {
        eprintln!("downstream: the project is left in {}", dir.display());
    }
    result
}

fn print_env() -> Result<()> {
    let b = bootstrap()?;
    for (k, v) in b.envs() {
        println!("export {k}='{}'", v.to_string_lossy());
    }
    Ok(())
}

fn fixtures(args: &[String]) -> Result<()> {
    let b = bootstrap()?;
    let reqs = root().join("python").join("requirements-fixtures.txt");
    pip_install(&b.python, &["-r".as_ref(), reqs.as_os_str()])?;
    let dir = root().join("python").join("fixtures");
    let mut scripts: Vec<PathBuf> = fs::read_dir(&dir)
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "py")
                && (args.is_empty()
                    || args
                        .iter()
                        .any(|a| p.to_string_lossy().contains(a.as_str())))
        })
        .collect();
    scripts.sort();
    for s in scripts {
        eprintln!("fixtures: {}", s.display());
        run(
            Command::new(&b.python).arg(&s).current_dir(root()),
            &s.display().to_string(),
        )?;
    }
    Ok(())
}
