//! LoRA parity with PEFT on the committed fixtures (`python/fixtures/lora_parity.py`): adapted and
//! merged and bypassed (adapter disabled) log-probs, gradients of the SFT loss (f64), and three AdamW steps with weight decay,
//! clipping and a warm-up schedule against `torch.optim.AdamW`.

use std::path::PathBuf;

use optimsyn_lm::{CausalLm, LoadOptions, LoraAdapter, LossBatch, MaskedSeq, WeightStore};
use optimsyn_optim::{AdamW, AdamWConfig, LrSchedule};
use serde_json::Value;
use tch::{Kind, Tensor};

use crate::common::*;

const CASES: &[&str] = &["qwen3_qkvo", "llama_mlp_rslora", "qwen2_bias_vo"];

fn case_dir(name: &str) -> PathBuf {
    fixture("lora").join(name)
}

fn case_expected(name: &str) -> Value {
    let text =
        std::fs::read_to_string(case_dir(name).join("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("json")
}

fn adapted(name: &str, kind: Kind) -> (CausalLm, LoraAdapter) {
    let mut model = CausalLm::load(
        case_dir(name).join("base"),
        LoadOptions {
            kind,
            ..Default::default()
        },
    )
    .expect("base");
    let adapter = LoraAdapter::load(&mut model, case_dir(name).join("adapter")).expect("adapter");
    (model, adapter)
}

fn sft_rows(exp: &Value) -> Vec<(Vec<u32>, Vec<u8>)> {
    exp["sft_batch"]
        .as_array()
        .expect("sft_batch")
        .iter()
        .map(|r| {
            (
                ids(&r["tokens"]),
                r["loss_mask"]
                    .as_array()
                    .expect("mask")
                    .iter()
                    .map(|m| m.as_u64().expect("0/1") as u8)
                    .collect(),
            )
        })
        .collect()
}

/// The fixture's rows as one right-padded loss batch.
fn loss_batch(model: &CausalLm, rows: &[(Vec<u32>, Vec<u8>)]) -> LossBatch {
    let seqs: Vec<MaskedSeq<'_>> = rows
        .iter()
        .map(|(t, m)| MaskedSeq {
            tokens: t,
            loss_mask: m,
        })
        .collect();
    LossBatch::new(&seqs, model.device()).expect("batch")
}

/// The per-sample-mean SFT loss of the fixture's batch (one padded batch).
fn sft_loss(model: &CausalLm, rows: &[(Vec<u32>, Vec<u8>)]) -> Tensor {
    let batch = loss_batch(model, rows);
    let per = model.per_sample_loss(&batch).expect("loss");
    let kind = per.kind();
    per.mean(kind)
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    (&a - &b).norm().double_value(&[]) / b.norm().double_value(&[]).max(1e-30)
}

#[test]
fn adapted_and_merged_logprobs_equal_peft() {
    for name in CASES {
        let exp = case_expected(name);
        let seqs: Vec<Vec<u32>> = exp["sequences"]
            .as_array()
            .expect("seqs")
            .iter()
            .map(ids)
            .collect();
        let rows: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let (mut model, adapter) = adapted(name, Kind::Float);
        assert_eq!(
            adapter.named_parameters().len(),
            exp["adapter_keys"].as_array().expect("keys").len()
        );
        let scale = exp["lora"]["scaling"].as_f64().expect("scaling");
        assert!(
            adapter
                .modules()
                .iter()
                .all(|m| (m.scale - scale).abs() < 1e-12),
            "{name}: scale"
        );
        let got = model.sequence_logprobs(&rows, 1.0).expect("logprobs");
        for (i, (g, w)) in got
            .iter()
            .zip(exp["logprobs"].as_array().expect("lp"))
            .enumerate()
        {
            let d = max_abs_diff(g, &floats(w));
            assert!(d < 1e-4, "{name} row {i}: |Δ| {d}");
        }
        let base: Vec<Vec<f32>> = exp["base_logprobs"]
            .as_array()
            .expect("base")
            .iter()
            .map(floats)
            .collect();
        assert!(
            max_abs_diff(&got[3], &base[3]) > 0.1,
            "{name}: the adapter must matter"
        );
        // Bypassed (PEFT's `disable_adapter`), the model computes as its base; restored, as before.
        // The guard restores the adapter however its scope ends, here by an early `?`.
        let bypassed_then_fail = || -> Result<Vec<Vec<f32>>, optimsyn_lm::Error> {
            let _base = adapter.bypass()?;
            let lp = model.sequence_logprobs(&rows, 1.0)?;
            Err(optimsyn_lm::Error::Input(format!(
                "{} rows, failing on purpose",
                lp.len()
            )))
        };
        assert!(bypassed_then_fail().is_err());
        let restored = model.sequence_logprobs(&rows, 1.0).expect("restored");
        assert!(
            max_abs_diff(&restored[3], &got[3]) < 1e-6,
            "{name}: restored after `?`"
        );
        let guard = adapter.bypass().expect("bypass");
        let bypassed = model.sequence_logprobs(&rows, 1.0).expect("bypassed");
        for (i, (g, w)) in bypassed.iter().zip(&base).enumerate() {
            let d = max_abs_diff(g, w);
            assert!(
                d < 1e-4,
                "{name} row {i}: adapter disabled, |Δ| vs base {d}"
            );
        }
        drop(guard);
        let again = model.sequence_logprobs(&rows, 1.0).expect("restored");
        assert!(max_abs_diff(&again[3], &got[3]) < 1e-6, "{name}: restored");
        adapter.merge_into(&mut model).expect("merge");
        let merged = model.sequence_logprobs(&rows, 1.0).expect("merged");
        for (g, w) in merged
            .iter()
            .zip(exp["merged_logprobs"].as_array().expect("lp"))
        {
            assert!(max_abs_diff(g, &floats(w)) < 1e-4, "{name}: merged");
        }
    }
}

#[test]
fn sft_loss_and_lora_gradients_equal_peft_in_f64() {
    for name in CASES {
        let exp = case_expected(name);
        let rows = sft_rows(&exp);
        let (model, adapter) = adapted(name, Kind::Double);
        let loss = sft_loss(&model, &rows);
        let want = exp["sft_loss_sample_mean"].as_f64().expect("loss");
        assert!(
            (loss.double_value(&[]) - want).abs() < 1e-9 * want.abs(),
            "{name}: loss {} vs {want}",
            loss.double_value(&[])
        );
        // Token-mean: summed masked NLL over the number of loss tokens.
        let batch = loss_batch(&model, &rows);
        let tok = model
            .masked_nll_sums(&batch)
            .expect("sums")
            .sum(Kind::Double)
            .double_value(&[])
            / batch.counts.iter().sum::<usize>() as f64;
        let want_tok = exp["sft_loss_token_mean"].as_f64().expect("token mean");
        assert!(
            (tok - want_tok).abs() < 1e-9 * want_tok,
            "{name}: token-mean {tok} vs {want_tok}"
        );

        loss.backward();
        let grads =
            WeightStore::open_file(case_dir(name).join("grads.safetensors")).expect("grads");
        for (key, p) in adapter.named_parameters() {
            let want = grads
                .load(&key, Kind::Double, tch::Device::Cpu)
                .expect("grad tensor");
            let e = rel_err(&p.grad(), &want);
            assert!(e < 1e-5, "{name}: {key}: relative error {e}");
        }
    }
}

#[test]
fn adamw_steps_with_decay_clipping_and_schedule_equal_torch() {
    for name in CASES {
        let exp = case_expected(name);
        let rows = sft_rows(&exp);
        let h = &exp["adamw"];
        let (model, adapter) = adapted(name, Kind::Float);
        let betas = h["betas"].as_array().expect("betas");
        let lr = h["lr"].as_f64().expect("lr");
        let mut opt = AdamW::new(AdamWConfig {
            lr,
            beta1: betas[0].as_f64().expect("b1"),
            beta2: betas[1].as_f64().expect("b2"),
            eps: h["eps"].as_f64().expect("eps"),
            weight_decay: h["weight_decay"].as_f64().expect("wd"),
        })
        .expect("adamw");
        for (k, p) in adapter.named_parameters() {
            opt.add(k, p).expect("add");
        }
        let sched = LrSchedule::linear(
            h["num_warmup_steps"].as_u64().expect("warmup"),
            h["num_training_steps"].as_u64().expect("total"),
        );
        let max_norm = h["max_norm"].as_f64().expect("max_norm");
        for step in 0..h["steps"].as_u64().expect("steps") as usize {
            opt.zero_grad();
            let loss = sft_loss(&model, &rows);
            let want_loss = exp["adamw_losses"][step].as_f64().expect("loss");
            assert!(
                (loss.double_value(&[]) - want_loss).abs() < 1e-4,
                "{name} step {step}: loss"
            );
            loss.backward();
            let norm = opt.clip_grad_norm(max_norm).expect("clip");
            let want_norm = exp["adamw_grad_norms"][step].as_f64().expect("norm");
            assert!(
                (norm - want_norm).abs() < 1e-4 * want_norm,
                "{name} step {step}: grad norm {norm} vs {want_norm}"
            );
            let got_lr = opt.set_scheduled_lr(&sched, lr);
            assert!((got_lr - exp["adamw_lrs"][step].as_f64().expect("lr")).abs() < 1e-12);
            opt.step().expect("step");
        }
        let after =
            WeightStore::open_file(case_dir(name).join("adamw.safetensors")).expect("adamw state");
        let load = |k: &str| {
            after
                .load(k, Kind::Float, tch::Device::Cpu)
                .expect("tensor")
        };
        for (key, p) in adapter.named_parameters() {
            let e = rel_err(p, &load(&format!("{key}.after_step3")));
            assert!(e < 1e-4, "{name}: {key}: parameters differ (relative {e})");
            let e = rel_err(
                opt.exp_avg(&key).expect("m"),
                &load(&format!("{key}.exp_avg")),
            );
            assert!(e < 1e-4, "{name}: {key}: exp_avg differs (relative {e})");
            let e = rel_err(
                opt.exp_avg_sq(&key).expect("v"),
                &load(&format!("{key}.exp_avg_sq")),
            );
            assert!(e < 1e-4, "{name}: {key}: exp_avg_sq differs (relative {e})");
        }
    }
}

/// The loss fuses the output projection with the cross-entropy when the head is frozen; with a
/// trainable head it goes through autograd over full logits. Both must give the same per-row sums
/// and the same LoRA gradients, padding and a row without loss tokens included.
#[test]
fn fused_loss_equals_the_autograd_one_in_values_and_lora_gradients() {
    for name in CASES {
        let exp = case_expected(name);
        let mut rows = sft_rows(&exp);
        let (first, _) = rows[0].clone();
        rows.push((
            first[..first.len().min(5)].to_vec(),
            vec![0; first.len().min(5)],
        ));
        let run = |trainable_head: bool| -> (Vec<f64>, Vec<(String, Tensor)>) {
            let (model, adapter) = adapted(name, Kind::Float);
            if trainable_head {
                // The loaded weights are leaves: flagging them makes them trainable in place.
                for (name, p) in model.named_parameters() {
                    if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
                        let _ = p.set_requires_grad(true);
                    }
                }
            }
            let batch = loss_batch(&model, &rows);
            let sums = model.masked_nll_sums(&batch).expect("sums");
            // Without a graph the fused path skips the gradient products: same values.
            let eval = tch::no_grad(|| model.masked_nll_sums(&batch)).expect("eval sums");
            assert!(!eval.requires_grad());
            assert!(
                eval.allclose(&sums.detach(), 1e-6, 1e-6, false),
                "{name}: eval sums"
            );
            let per = model.per_sample_loss(&batch).expect("per-sample");
            (sums.sum(Kind::Float) + per.sum(Kind::Float)).backward();
            let values = Vec::<f64>::try_from(sums.to_kind(Kind::Double)).expect("values");
            let grads = adapter
                .named_parameters()
                .into_iter()
                .map(|(k, p)| (k, p.grad()))
                .collect();
            (values, grads)
        };
        let (fused, fused_grads) = run(false);
        let (plain, plain_grads) = run(true);
        assert_eq!(fused.len(), rows.len());
        assert_eq!(
            *fused.last().expect("row"),
            0.0,
            "{name}: row without targets"
        );
        for (i, (a, b)) in fused.iter().zip(&plain).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{name} row {i}: {a} vs {b}"
            );
        }
        for ((k, a), (_, b)) in fused_grads.iter().zip(&plain_grads) {
            assert!(
                a.isfinite().all().int64_value(&[]) == 1,
                "{name}: {k} not finite"
            );
            let e = rel_err(a, b);
            assert!(e < 1e-4, "{name}: {k}: relative error {e}");
        }
    }
}
