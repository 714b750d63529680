//! Random init, saving HF folders, LoRA attach/save/load/merge, the masked loss, and SFT with
//! checkpoints: resumed runs equal uninterrupted ones bit for bit, bad rows and NaN losses are
//! handled.

use std::path::Path;
use std::process::Command;

use optimsyn_data_io::ModelConfig;
use optimsyn_lm::sft::{self, list_checkpoints};
use optimsyn_lm::{
    CausalLm, DataInfo, LoadOptions, LoraAdapter, LoraConfig, LossBatch, MaskedSeq, SftConfig,
    TargetModules, TrainExample, Trainable,
};
use tch::{Kind, Tensor};

use crate::common::*;

fn seqs() -> Vec<Vec<u32>> {
    vec![
        vec![5, 9, 11, 3, 60, 2],
        vec![7, 7, 40, 1, 33, 21, 8, 9, 10, 12, 50],
        vec![4, 30, 2],
    ]
}

fn rows(s: &[Vec<u32>]) -> Vec<&[u32]> {
    s.iter().map(Vec::as_slice).collect()
}

/// Fills every LoRA B with seeded values so the adapter changes the model's outputs.
fn perturb(adapter: &LoraAdapter, seed: i64) {
    let _g = tch::no_grad_guard();
    tch::manual_seed(seed);
    for m in adapter.modules() {
        let mut b = m.b.shallow_clone();
        b.copy_(&(Tensor::randn(b.size(), (Kind::Float, tch::Device::Cpu)) * 0.3));
    }
}

fn python() -> String {
    std::env::var("OPTIMSYN_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// transformers' (and PEFT's, with an adapter) log-probs of `seqs` on a folder, via the reference script.
fn reference_logprobs(model: &Path, adapter: Option<&Path>, seqs: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("seqs.json");
    std::fs::write(&input, serde_json::json!({ "sequences": seqs }).to_string()).expect("write");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../python/checks/hf_logprobs.py");
    let mut cmd = Command::new(python());
    cmd.arg(script).arg(model).arg(&input);
    if let Some(a) = adapter {
        cmd.arg(a);
    }
    let out = cmd
        .output()
        .expect("run the reference python (OPTIMSYN_PYTHON)");
    assert!(
        out.status.success(),
        "reference failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("reference json");
    v["logprobs"]
        .as_array()
        .expect("logprobs")
        .iter()
        .map(floats)
        .collect()
}

#[test]
fn random_model_saves_a_folder_that_loads_here_and_in_transformers() {
    for name in ["qwen3_tied_gqa", "qwen2_untied_mha", "llama_bias_headdim"] {
        let cfg = ModelConfig::from_file(fixture(name).join("config.json")).expect("config");
        let a = CausalLm::random(&cfg, 7, Some(0.3), LoadOptions::default()).expect("random init");
        let b = CausalLm::random(&cfg, 7, Some(0.3), LoadOptions::default()).expect("random init");
        let c = CausalLm::random(&cfg, 8, Some(0.3), LoadOptions::default()).expect("random init");
        let s = seqs();
        let la = a.sequence_logprobs(&rows(&s), 1.0).expect("logprobs");
        assert_eq!(
            la,
            b.sequence_logprobs(&rows(&s), 1.0).expect("logprobs"),
            "{name}: same seed, same model"
        );
        assert_ne!(
            la,
            c.sequence_logprobs(&rows(&s), 1.0).expect("logprobs"),
            "{name}: other seed, other model"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        a.save_pretrained(dir.path()).expect("save");
        let back = CausalLm::load(dir.path(), LoadOptions::default()).expect("reload");
        assert_eq!(
            back.sequence_logprobs(&rows(&s), 1.0).expect("logprobs"),
            la,
            "{name}: reload"
        );
        let reference = reference_logprobs(dir.path(), None, &s);
        for (g, w) in la.iter().zip(&reference) {
            let d = max_abs_diff(g, w);
            assert!(d < 1e-4, "{name}: transformers disagrees by {d}");
        }
    }
}

#[test]
fn fresh_lora_leaves_the_model_unchanged_and_saved_adapters_load_back_and_in_peft() {
    let name = "qwen3_tied_gqa";
    let s = seqs();
    let base = load(name).sequence_logprobs(&rows(&s), 1.0).expect("base");
    let mut model = load(name);
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        target_modules: TargetModules::default(),
        ..Default::default()
    };
    let adapter = LoraAdapter::init(&mut model, cfg, 3).expect("init");
    assert_eq!(adapter.modules().len(), 2 * 4);
    assert_eq!(
        model.sequence_logprobs(&rows(&s), 1.0).expect("lora"),
        base,
        "B = 0 at init"
    );
    perturb(&adapter, 1);
    let adapted = model.sequence_logprobs(&rows(&s), 1.0).expect("lora");
    assert!(
        max_abs_diff(&adapted[1], &base[1]) > 1e-2,
        "a nonzero B must change log-probs"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    adapter.save(dir.path()).expect("save adapter");
    let mut again = load(name);
    let _loaded = LoraAdapter::load(&mut again, dir.path()).expect("load adapter");
    assert_eq!(
        again.sequence_logprobs(&rows(&s), 1.0).expect("reloaded"),
        adapted
    );

    // PEFT reads the same folder and computes the same log-probs.
    let reference = reference_logprobs(&fixture(name), Some(dir.path()), &s);
    for (g, w) in adapted.iter().zip(&reference) {
        let d = max_abs_diff(g, w);
        assert!(d < 1e-4, "PEFT disagrees by {d}");
    }

    // Merging folds the adapter into the base weights without changing the outputs.
    adapter.merge_into(&mut model).expect("merge");
    let merged = model.sequence_logprobs(&rows(&s), 1.0).expect("merged");
    for (g, w) in merged.iter().zip(&adapted) {
        assert!(max_abs_diff(g, w) < 1e-5);
    }
    let out = tempfile::tempdir().expect("tempdir");
    model.save_pretrained(out.path()).expect("save merged");
    let reference = reference_logprobs(out.path(), None, &s);
    for (g, w) in merged.iter().zip(&reference) {
        assert!(max_abs_diff(g, w) < 1e-4);
    }
}

#[test]
fn adapters_for_another_rank_or_architecture_are_refused_by_name() {
    let mut model = load("qwen3_tied_gqa");
    let adapter = LoraAdapter::init(
        &mut model,
        LoraConfig {
            r: 4,
            ..Default::default()
        },
        0,
    )
    .expect("init");
    let dir = tempfile::tempdir().expect("tempdir");
    adapter.save(dir.path()).expect("save");

    // Another rank: the config says 8, the tensors are rank 4.
    let cfg_path = dir.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).expect("config");
    std::fs::write(&cfg_path, text.replace("\"r\": 4", "\"r\": 8")).expect("write");
    let mut model = load("qwen3_tied_gqa");
    let err = LoraAdapter::load(&mut model, dir.path())
        .expect_err("rank mismatch")
        .to_string();
    assert!(
        err.contains("lora_A.weight") && err.contains("r = 8"),
        "{err}"
    );
    let adapted = |m: &mut CausalLm| {
        m.linear_layers_mut()
            .iter()
            .filter(|l| l.has_adapter())
            .count()
    };
    assert_eq!(
        adapted(&mut model),
        0,
        "a failed load leaves no layer adapted"
    );
    std::fs::write(&cfg_path, &text).expect("write");

    // Another architecture: a model with other layer widths.
    let err = LoraAdapter::load(&mut load("qwen2_untied_mha"), dir.path())
        .expect_err("arch mismatch")
        .to_string();
    assert!(
        err.contains("q_proj.lora_A.weight") && err.contains("shape"),
        "{err}"
    );
    // Fewer layers than the adapter: the extra tensors are named.
    let mut model = load("llama_tied_gqa");
    let err = LoraAdapter::load(&mut model, dir.path())
        .expect_err("other model")
        .to_string();
    assert!(err.contains("lora_"), "{err}");
    assert_eq!(adapted(&mut model), 0);

    // A truncated weights file and an unsupported feature.
    let w = dir.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&w).expect("weights");
    std::fs::write(&w, &bytes[..bytes.len() / 2]).expect("truncate");
    let err = LoraAdapter::load(&mut load("qwen3_tied_gqa"), dir.path())
        .expect_err("truncated")
        .to_string();
    assert!(err.contains("adapter_model.safetensors"), "{err}");
    std::fs::write(&w, &bytes).expect("restore");
    std::fs::write(
        &cfg_path,
        text.replace("\"use_dora\": false", "\"use_dora\": true"),
    )
    .expect("write");
    let err = LoraAdapter::load(&mut load("qwen3_tied_gqa"), dir.path())
        .expect_err("dora")
        .to_string();
    assert!(err.contains("use_dora"), "{err}");
}

#[test]
fn per_sample_loss_does_not_depend_on_the_batch_and_empty_rows_give_zero() {
    let model = load("llama_rope3");
    let s = seqs();
    let masks: Vec<Vec<u8>> = s
        .iter()
        .enumerate()
        .map(|(i, t)| {
            t.iter()
                .enumerate()
                .map(|(j, _)| u8::from(j >= 2 && i != 2))
                .collect()
        })
        .collect();
    let all: Vec<MaskedSeq<'_>> = s
        .iter()
        .zip(&masks)
        .map(|(t, m)| MaskedSeq {
            tokens: t,
            loss_mask: m,
        })
        .collect();
    let b = LossBatch::new(&all, tch::Device::Cpu).expect("batch");
    let together = Vec::<f32>::try_from(&model.per_sample_loss(&b).expect("loss")).expect("vec");
    assert_eq!(
        together[2], 0.0,
        "a row with no loss token has loss 0, not NaN"
    );
    for (i, row) in all.iter().enumerate() {
        let one = LossBatch::new(&[*row], tch::Device::Cpu).expect("batch");
        let alone = Vec::<f32>::try_from(&model.per_sample_loss(&one).expect("loss")).expect("vec");
        assert!(
            (alone[0] - together[i]).abs() < 1e-5,
            "row {i}: {} vs {}",
            alone[0],
            together[i]
        );
        // The mean of the row's masked token NLLs, from plain log-probs.
        let lp = model.sequence_logprobs(&[row.tokens], 1.0).expect("lp");
        let picked: Vec<f32> = lp[0]
            .iter()
            .enumerate()
            .filter(|(j, _)| row.loss_mask[j + 1] == 1)
            .map(|(_, x)| -x)
            .collect();
        if !picked.is_empty() {
            let want = picked.iter().sum::<f32>() / picked.len() as f32;
            assert!((want - together[i]).abs() < 1e-5);
        }
    }
}

fn dataset() -> Vec<TrainExample> {
    (0..10u32)
        .map(|i| {
            let len = 6 + (i as usize * 7) % 13;
            let tokens: Vec<u32> = (0..len as u32).map(|j| (i * 13 + j * 7) % 60 + 3).collect();
            let loss_mask = (0..len).map(|j| u8::from(j >= len / 2)).collect();
            TrainExample {
                id: format!("ex{i}"),
                tokens,
                loss_mask,
                subtask: Some(["a", "b"][i as usize % 2].into()),
            }
        })
        .collect()
}

fn sft_cfg() -> SftConfig {
    SftConfig {
        lr: 5e-3,
        weight_decay: 0.01,
        epochs: 2,
        batch_size: 4,
        max_batch_tokens: 40,
        warmup_ratio: 0.2,
        checkpoints: 3,
        seed: 11,
        ..Default::default()
    }
}

fn lora_cfg() -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.1,
        target_modules: TargetModules::List(vec!["all-linear".into()]),
        ..Default::default()
    }
}

fn train_lora(out: &Path) -> (Vec<(String, Vec<f32>)>, sft::SftReport) {
    let mut model = load("qwen3_tied_gqa");
    let adapter = LoraAdapter::init(&mut model, lora_cfg(), 5).expect("init");
    let info = DataInfo {
        data_hash: Some("h".into()),
        ..Default::default()
    };
    let report = sft::train(
        &mut model,
        Trainable::Lora(&adapter),
        &dataset(),
        &sft_cfg(),
        &info,
        out,
        &mut |_| {},
    )
    .expect("train");
    let params = adapter
        .named_parameters()
        .into_iter()
        .map(|(k, t)| (k, Vec::<f32>::try_from(&t.flatten(0, -1)).expect("vec")))
        .collect();
    (params, report)
}

#[test]
fn sft_lowers_the_loss_and_a_resumed_run_ends_bit_identical() {
    let a = tempfile::tempdir().expect("tempdir");
    let (full, report) = train_lora(a.path());
    assert_eq!(report.steps, 6);
    let ckpts = list_checkpoints(a.path()).expect("list");
    assert_eq!(ckpts.keys().copied().collect::<Vec<_>>(), vec![2, 4, 6]);
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "training.json",
        "metrics.jsonl",
    ] {
        assert!(
            a.path().join(f).exists(),
            "{f} missing from the output folder"
        );
    }
    let rec = optimsyn_lm::TrainingRecord::load(&ckpts[&4]).expect("record");
    assert_eq!(rec.steps, 4);
    assert!(rec.avg_lr > 0.0 && rec.avg_lr <= 5e-3);
    let state = optimsyn_optim::OptimizerState::load(ckpts[&4].join("optimizer.safetensors"))
        .expect("moments");
    assert_eq!(state.step, 4);
    assert!(
        state
            .exp_avg_sq("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
            .is_some()
    );

    let metrics = std::fs::read_to_string(a.path().join("metrics.jsonl")).expect("metrics");
    let losses: Vec<f64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("row")["loss"]
                .as_f64()
                .expect("loss")
        })
        .collect();
    assert_eq!(losses.len(), 6);
    assert!(losses[5] < losses[1], "loss did not go down: {losses:?}");

    // Kill after checkpoint-4: what remains is what a crash in step 5 or 6 leaves.
    let b = tempfile::tempdir().expect("tempdir");
    train_lora(b.path());
    std::fs::remove_dir_all(b.path().join("checkpoint-6")).expect("rm");
    for f in [
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "training.json",
    ] {
        std::fs::remove_file(b.path().join(f)).expect("rm");
    }
    let (resumed, report) = train_lora(b.path());
    assert_eq!(report.resumed_from, 4);
    assert_eq!(
        resumed, full,
        "resumed run differs from the uninterrupted one"
    );
    let again = std::fs::read_to_string(b.path().join("metrics.jsonl")).expect("metrics");
    assert_eq!(
        again.lines().count(),
        6,
        "no duplicated metrics rows after resume"
    );
}

#[test]
fn full_training_and_bad_rows_and_nan_losses() {
    let mut data = dataset();
    // A row with no loss token is skipped and counted, never a NaN.
    data.push(TrainExample {
        id: "no-answer".into(),
        tokens: vec![3, 4, 5],
        loss_mask: vec![0, 0, 0],
        subtask: None,
    });
    let cfg = SftConfig {
        epochs: 3,
        batch_size: 11,
        checkpoints: 1,
        warmup_ratio: 0.0,
        ..sft_cfg()
    };
    let mut model = load("qwen2_tied_gqa");
    let before = sft::evaluate(&model, &data, 64).expect("eval");
    assert_eq!(before.skipped, 1);
    assert_eq!(before.subtasks.len(), 2);
    let out = tempfile::tempdir().expect("tempdir");
    let report = sft::train(
        &mut model,
        Trainable::Full,
        &data,
        &cfg,
        &DataInfo::default(),
        out.path(),
        &mut |_| {},
    )
    .expect("full training");
    assert_eq!(report.skipped, 1);
    let after = sft::evaluate(&model, &data, 64).expect("eval");
    assert!(
        after.overall.loss < before.overall.loss,
        "{} !< {}",
        after.overall.loss,
        before.overall.loss
    );
    // The saved full model reloads with the trained weights.
    let back = CausalLm::load(out.path(), LoadOptions::default()).expect("reload");
    let again = sft::evaluate(&back, &data, 64).expect("eval");
    assert!((again.overall.loss - after.overall.loss).abs() < 1e-6);

    // A NaN weight makes the loss NaN: a clear error naming the step, and no checkpoint for it.
    // Untied, so the NaN embedding row does not reach the output projection of every row.
    let mut model = load("qwen3_untied_theta");
    let adapter = LoraAdapter::init(&mut model, lora_cfg(), 5).expect("init");
    let cfg = SftConfig {
        epochs: 1,
        batch_size: 2,
        checkpoints: 5,
        ..sft_cfg()
    };
    let out = tempfile::tempdir().expect("tempdir");
    let mut seen = 0;
    {
        // Token 63 appears only in the poisoned row.
        let _g = tch::no_grad_guard();
        let _ = model.embed_tokens().get(63).fill_(f64::NAN);
    }
    let mut poisoned = dataset();
    poisoned.push(TrainExample {
        id: "poison".into(),
        tokens: vec![5, 63, 7, 8],
        loss_mask: vec![0, 1, 1, 1],
        subtask: None,
    });
    let err = sft::train(
        &mut model,
        Trainable::Lora(&adapter),
        &poisoned,
        &cfg,
        &DataInfo::default(),
        out.path(),
        &mut |_| seen += 1,
    )
    .expect_err("NaN loss")
    .to_string();
    assert!(
        err.contains("not finite") && err.contains("poison"),
        "{err}"
    );
    let failed_step: u64 = err
        .trim_start_matches("step ")
        .split(':')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("step in message");
    assert_eq!(failed_step, seen + 1);
    let ckpts = list_checkpoints(out.path()).expect("list");
    assert!(
        ckpts.keys().all(|&s| s < failed_step),
        "a checkpoint was written at or after the NaN step"
    );
}
