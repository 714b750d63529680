//! The scorer against an independent slow implementation of the formula, projections against
//! exact scores, the features cache, and bad inputs.

use std::collections::BTreeMap;

use optimsyn_data_io::{ChatExample, ChatFormat, ChatMessage, ChatTokenizer};
use optimsyn_influence::{
    InfluenceScorer, Precond, ProjectorKind, ScoreConfig, SubtaskAgg, encode_examples,
};
use optimsyn_lm::sft::TrainingRecord;
use optimsyn_lm::{CausalLm, LoadOptions, LoraAdapter};
use optimsyn_optim::OptimizerState;
use tch::{Kind, Tensor};

use crate::common::*;

fn cfg(projector: ProjectorKind) -> ScoreConfig {
    ScoreConfig {
        projector,
        ..Default::default()
    }
}

/// IF by the book: autograd one sample at a time, Γ = m'/√(v'+ε) element by element from the
/// optimizer file, cosines, checkpoint weights = avg_lr normalized, subtask means, max.
fn reference_scores(
    ckpts: &[std::path::PathBuf],
    val: &[ChatExample],
    cands: &[ChatExample],
) -> Vec<f64> {
    let tok = ChatTokenizer::from_model_dir(model_dir()).unwrap();
    let venc = encode_examples(&tok, val, ChatFormat::Tulu, None).unwrap();
    let cenc = encode_examples(&tok, cands, ChatFormat::Tulu, None).unwrap();
    let w: Vec<f64> = ckpts
        .iter()
        .map(|d| TrainingRecord::load(d).unwrap().avg_lr)
        .collect();
    let wsum: f64 = w.iter().sum();
    let mut total = vec![vec![0f64; val.len()]; cands.len()];
    for (ci, dir) in ckpts.iter().enumerate() {
        let mut model = CausalLm::load(
            model_dir(),
            LoadOptions {
                kind: Kind::Double,
                ..Default::default()
            },
        )
        .unwrap();
        let adapter = LoraAdapter::load(&mut model, dir).unwrap();
        let state = OptimizerState::load(dir.join("optimizer.safetensors")).unwrap();
        let (m, v): (Vec<Tensor>, Vec<Tensor>) = adapter
            .named_parameters()
            .iter()
            .map(|(k, _)| {
                (
                    state
                        .exp_avg(k)
                        .unwrap()
                        .reshape([-1])
                        .to_kind(Kind::Double),
                    state
                        .exp_avg_sq(k)
                        .unwrap()
                        .reshape([-1])
                        .to_kind(Kind::Double),
                )
            })
            .unzip();
        let (m, v) = (Tensor::cat(&m, 0), Tensor::cat(&v, 0));
        let vals: Vec<Tensor> = venc
            .iter()
            .map(|e| reference_grad(&model, &adapter, e))
            .collect();
        for (i, e) in cenc.iter().enumerate() {
            let g = reference_grad(&model, &adapter, e);
            let m2 = &m * state.beta1 + &g * (1.0 - state.beta1);
            let v2 = &v * state.beta2 + g.square() * (1.0 - state.beta2);
            let gamma = m2 / (v2 + state.eps).sqrt();
            for (j, vg) in vals.iter().enumerate() {
                let cos = gamma.dot(vg).double_value(&[])
                    / (gamma.norm().double_value(&[]) * vg.norm().double_value(&[]));
                total[i][j] += w[ci] / wsum * cos;
            }
        }
    }
    total
        .iter()
        .map(|row| {
            let mut by: BTreeMap<String, (f64, usize)> = BTreeMap::new();
            for (j, x) in row.iter().enumerate() {
                let e = by
                    .entry(val[j].subtask.clone().unwrap_or_default())
                    .or_default();
                e.0 += x;
                e.1 += 1;
            }
            by.values()
                .map(|(s, n)| s / *n as f64)
                .fold(f64::NEG_INFINITY, f64::max)
        })
        .collect()
}

fn spearman(a: &[f64], b: &[f64]) -> f64 {
    fn ranks(x: &[f64]) -> Vec<f64> {
        let mut idx: Vec<usize> = (0..x.len()).collect();
        idx.sort_by(|&i, &j| x[i].total_cmp(&x[j]));
        let mut r = vec![0.0; x.len()];
        for (k, &i) in idx.iter().enumerate() {
            r[i] = k as f64;
        }
        r
    }
    optimsyn_influence::pearson(&ranks(a), &ranks(b))
}

#[test]
fn exact_scores_equal_the_formula_and_projections_preserve_them() {
    let dir = tempfile::tempdir().unwrap();
    let ckpts = warmup(dir.path());
    assert_eq!(ckpts.len(), 2);
    let val = validation();
    let mut cands = chats(40, 3, None);
    cands.push(ChatExample {
        id: Some("no-answer".into()),
        messages: vec![ChatMessage::user("hello?")],
        subtask: None,
    });
    let reference = reference_scores(&ckpts, &val, &cands[..40]);

    let mut exact = InfluenceScorer::new(
        &model_dir(),
        &ckpts,
        &val,
        cfg(ProjectorKind::Exact),
        LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(exact.subtasks(), ["law", "med"]);
    let scores = exact.score(&cands).unwrap();
    for (s, want) in scores.iter().zip(&reference) {
        let got = s.influence.unwrap();
        assert!((got - want).abs() < 1e-4, "{}: {got} vs {want}", s.id);
        assert_eq!(s.subtasks.len(), 2);
    }
    let last = scores.last().unwrap();
    assert_eq!(
        (last.influence, last.loss_tokens),
        (None, 0),
        "no loss tokens: no score, no NaN"
    );
    assert!(last.reason.is_some());
    let spread = reference.iter().copied().fold(f64::NEG_INFINITY, f64::max)
        - reference.iter().copied().fold(f64::INFINITY, f64::min);
    assert!(spread > 0.05, "scores too flat to test ranking: {spread}");

    // Projections: each cosine within c/√k of the exact one (c = 4), ranking kept.
    let k = 8192;
    for kind in [
        ProjectorKind::Dense { k, seed: 0 },
        ProjectorKind::Sjlt { k, s: 4, seed: 0 },
    ] {
        let mut sc = InfluenceScorer::new(
            &model_dir(),
            &ckpts,
            &val,
            cfg(kind),
            LoadOptions::default(),
        )
        .unwrap();
        let got: Vec<f64> = sc
            .score(&cands[..40])
            .unwrap()
            .iter()
            .map(|s| s.influence.unwrap())
            .collect();
        for (g, w) in got.iter().zip(&reference) {
            assert!(
                (g - w).abs() < 4.0 / (k as f64).sqrt(),
                "{kind:?}: {g} vs {w}"
            );
        }
        let rho = spearman(&got, &reference);
        assert!(rho > 0.95, "{kind:?}: Spearman {rho}");
    }

    // Mean over subtasks, and the bias-corrected preconditioner, are other numbers.
    let mut mean = InfluenceScorer::new(
        &model_dir(),
        &ckpts,
        &val,
        ScoreConfig {
            subtask_agg: SubtaskAgg::Mean,
            precond: Precond::BiasCorrected,
            ..cfg(ProjectorKind::Exact)
        },
        LoadOptions::default(),
    )
    .unwrap();
    let m = mean.score(&cands[..3]).unwrap();
    assert!(
        m.iter()
            .zip(&scores)
            .all(|(a, b)| a.influence != b.influence)
    );
}

#[test]
fn validation_features_are_stored_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let ckpts = warmup(dir.path());
    let val = validation();
    let feats = tempfile::tempdir().unwrap();
    let c = ScoreConfig {
        features_dir: Some(feats.path().to_path_buf()),
        ..cfg(ProjectorKind::Sjlt {
            k: 512,
            s: 4,
            seed: 1,
        })
    };
    let mut a = InfluenceScorer::new(
        &model_dir(),
        &ckpts,
        &val,
        c.clone(),
        LoadOptions::default(),
    )
    .unwrap();
    let files: Vec<_> = std::fs::read_dir(feats.path()).unwrap().flatten().collect();
    assert_eq!(files.len(), 2, "one features file per checkpoint");
    let cands = chats(4, 5, None);
    let first = a.score(&cands).unwrap();
    // Reused: a corrupted cache would be recomputed, an intact one gives identical scores.
    let mut b = InfluenceScorer::new(
        &model_dir(),
        &ckpts,
        &val,
        c.clone(),
        LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(b.score(&cands).unwrap(), first);
    // Other validation data: other features, a new file.
    let _ =
        InfluenceScorer::new(&model_dir(), &ckpts, &val[..3], c, LoadOptions::default()).unwrap();
    assert_eq!(std::fs::read_dir(feats.path()).unwrap().count(), 4);
}

#[test]
fn bad_inputs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let ckpts = warmup(dir.path());
    let val = validation();
    let err = InfluenceScorer::new(
        &model_dir(),
        &ckpts,
        &[],
        ScoreConfig::default(),
        LoadOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("validation set is empty"), "{err}");
    let err = InfluenceScorer::new(
        &model_dir(),
        &[],
        &val,
        ScoreConfig::default(),
        LoadOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("checkpoint"), "{err}");

    // Moments missing for a parameter.
    let broken = tempfile::tempdir().unwrap();
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "training.json",
    ] {
        std::fs::copy(ckpts[0].join(f), broken.path().join(f)).unwrap();
    }
    let mut state = OptimizerState::load(ckpts[0].join("optimizer.safetensors")).unwrap();
    let victim = state.keys().next().unwrap().to_string();
    let mut kept = OptimizerState::new(&Default::default(), state.step);
    for (k, p) in state.iter() {
        if k != victim {
            kept.insert(k.to_string(), &p.exp_avg, &p.exp_avg_sq)
                .unwrap();
        }
    }
    kept.beta1 = state.beta1;
    kept.save(broken.path().join("optimizer.safetensors"))
        .unwrap();
    state = kept;
    assert!(state.exp_avg(&victim).is_none());
    let err = InfluenceScorer::new(
        &model_dir(),
        &[broken.path().to_path_buf()],
        &val,
        ScoreConfig::default(),
        LoadOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains(&victim) && err.contains("moments"), "{err}");

    // An adapter for another model.
    let other = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../lm/tests/fixtures/lora/llama_mlp_rslora/adapter");
    let err = InfluenceScorer::new(
        &model_dir(),
        &[other],
        &val,
        ScoreConfig {
            format: Some(ChatFormat::Tulu),
            ..Default::default()
        },
        LoadOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("lora_A.weight"), "{err}");

    // A format that does not match the warm-up's.
    let err = InfluenceScorer::new(
        &model_dir(),
        &ckpts,
        &val,
        ScoreConfig {
            format: Some(ChatFormat::ChatTemplate),
            ..Default::default()
        },
        LoadOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("format"), "{err}");
}

#[test]
fn first_order_prediction_matches_real_steps() {
    let dir = tempfile::tempdir().unwrap();
    let ckpts = warmup(dir.path());
    let val = validation();
    let mut s = InfluenceScorer::new(
        &model_dir(),
        &ckpts[1..],
        &val,
        cfg(ProjectorKind::Exact),
        LoadOptions::default(),
    )
    .unwrap();
    let cands = chats(12, 7, None);
    let before = s.score(&cands).unwrap();
    let r = optimsyn_influence::verify(&mut s, &val, &cands, Some(1e-4)).unwrap();
    assert_eq!(r.checks.len(), 12);
    assert!(r.pearson >= 0.9, "Pearson {} ({:?})", r.pearson, r.checks);
    // The automatic step lands in the first-order regime: actual ≈ predicted, not just correlated.
    let auto = optimsyn_influence::verify(&mut s, &val, &cands, None).unwrap();
    assert!(auto.pearson >= 0.9, "auto: Pearson {}", auto.pearson);
    assert!(
        (0.8..1.25).contains(&auto.linearity),
        "auto: actual/predicted {} at lr {}",
        auto.linearity,
        auto.lr
    );
    let err = optimsyn_influence::verify(&mut s, &val, &cands, Some(-1.0)).unwrap_err();
    assert!(err.to_string().contains("step size"), "{err}");
    // The weights were restored: scores are unchanged.
    assert_eq!(s.score(&cands).unwrap(), before);
    // A smaller call reuses the first rows of the gradient buffer the larger one left behind.
    let few = s.score(&cands[3..8]).unwrap();
    for (a, b) in few.iter().zip(&before[3..8]) {
        let (x, y) = (a.influence.unwrap(), b.influence.unwrap());
        assert!((x - y).abs() <= 1e-5, "{}: {x} vs {y}", a.id);
    }
    s.release_buffer();
    assert_eq!(s.score(&cands).unwrap(), before);
}
