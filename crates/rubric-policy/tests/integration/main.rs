//! `RubricPolicy` on the demo's tiny policy model (pretrained on the demo corpus to write rubrics
//! under the demo's templates): seeded, batch-independent drafts that mostly parse, and log-probs
//! the GRPO trainer can trust (recomputed = sampled, the reference = the base without its adapter).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use optimsyn_data_io::{ChatTokenizer, SeedDoc, read_jsonl};
use optimsyn_lm::{CausalLm, LoadOptions, LoraAdapter, LoraConfig, row_key};
use optimsyn_rl_grpo::{Policy, RolloutConfig, SampleRequest, TokenBatch};
use optimsyn_rubric_policy::{PolicyPrompt, RubricPolicy, RubricSampling};

mod snapshots;

fn demo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../optimsyn/demo")
}

fn prompt() -> PolicyPrompt {
    let t = demo().join("templates");
    PolicyPrompt::from_files(
        Some(&t.join("policy_system.jinja")),
        Some(&t.join("policy_user.jinja")),
    )
    .unwrap()
}

fn policy(lora: bool) -> (RubricPolicy, ChatTokenizer) {
    let dir = demo().join("models/policy");
    let tok = ChatTokenizer::from_model_dir(&dir).unwrap();
    let mut model = CausalLm::load(&dir, LoadOptions::default()).unwrap();
    let adapter = lora.then(|| {
        let a = LoraAdapter::init(&mut model, LoraConfig::default(), 3).unwrap();
        // B starts at 0 (the adapter is the identity); move it so the adapter changes the model.
        let _g = tch::no_grad_guard();
        for (_, t) in a.named_parameters() {
            let mut t = t.shallow_clone();
            let _ = t.g_add_(&(t.randn_like() * 0.02));
        }
        a
    });
    let mut stop = tok.eos_token_ids();
    stop.extend(model.eos_token_ids());
    (RubricPolicy::new(model, adapter, stop), tok)
}

fn docs() -> Vec<SeedDoc> {
    read_jsonl(demo().join("seeds.jsonl")).unwrap()
}

fn how(per_doc: usize, seed: u64) -> RubricSampling {
    RubricSampling {
        per_doc,
        seed,
        sampling: RolloutConfig {
            temperature: 1.0,
            max_new_tokens: 96,
            ..Default::default()
        },
        ..Default::default()
    }
}

#[test]
fn drafts_are_seeded_and_do_not_depend_on_the_other_documents_in_the_call() {
    tch::set_num_threads(1);
    let (mut p, tok) = policy(false);
    let docs = docs();
    let pp = prompt();
    let alone = p.write_rubrics(&tok, &pp, &docs[..1], &how(3, 5)).unwrap();
    let with_others = p.write_rubrics(&tok, &pp, &docs[..4], &how(3, 5)).unwrap();
    assert_eq!(with_others.len(), 12);
    assert_eq!(alone, with_others[..3].to_vec());
    for (i, d) in with_others.iter().enumerate() {
        assert_eq!(
            (d.seed_id.as_str(), d.index),
            (docs[i / 3].id.as_str(), i % 3)
        );
    }
    let again = p.write_rubrics(&tok, &pp, &docs[..4], &how(3, 5)).unwrap();
    assert_eq!(again, with_others);
    let other_seed = p.write_rubrics(&tok, &pp, &docs[..4], &how(3, 6)).unwrap();
    assert_ne!(other_seed, with_others, "another seed draws other rubrics");
    // The demo policy learned the format: most of its rubrics parse at temperature 1.
    let parsed = with_others.iter().filter(|d| d.rubric.is_ok()).count();
    assert!(parsed >= 8, "{parsed}/12 drafts parse: {with_others:#?}");
}

#[test]
fn recomputed_logprobs_equal_the_sampled_ones_and_the_reference_is_the_base() {
    tch::set_num_threads(1);
    let (mut p, tok) = policy(true);
    let docs = docs();
    let pp = prompt();
    let prompts: Vec<Vec<u32>> = docs[..2]
        .iter()
        .map(|d| pp.encode(&tok, "general", &d.text, None).unwrap())
        .collect();
    let g = 3;
    let keys: Vec<u64> = (0..prompts.len() * g)
        .map(|r| row_key(&format!("r{r}")))
        .collect();
    let temperature = 1.3;
    let req = SampleRequest {
        prompts: prompts.iter().map(Vec::as_slice).collect(),
        group_size: g,
        seed: 11,
        keys,
        sampling: RolloutConfig {
            temperature,
            max_new_tokens: 40,
            ..Default::default()
        },
    };
    let comps = p.sample(&req).unwrap();
    assert_eq!(comps.len(), 6);
    let batch = TokenBatch {
        prompts: req.row_prompts().map(|(pr, _)| pr).collect(),
        completions: comps.iter().map(|c| c.tokens.as_slice()).collect(),
    };
    let lp = p.logprobs(&batch, temperature, true).unwrap();
    let width = batch.completion_width();
    for (row, c) in comps.iter().enumerate() {
        let got = Vec::<f32>::try_from(lp.logprobs.get(row as i64).narrow(
            0,
            0,
            c.tokens.len() as i64,
        ))
        .unwrap();
        for (t, (a, b)) in got.iter().zip(&c.logprobs).enumerate() {
            assert!(
                (a - b).abs() < 1e-4,
                "row {row} token {t}: recomputed {a}, sampled {b}"
            );
        }
    }
    assert_eq!(lp.logprobs.size(), [6, width as i64]);
    assert!(lp.entropy.is_some());

    // The reference: the same model with the adapter off, i.e. the plain base model.
    let reference = p.reference_logprobs(&batch, temperature).unwrap().unwrap();
    let (base, _) = policy(false);
    let base_lp = base.logprobs(&batch, temperature, false).unwrap().logprobs;
    let diff = f64::try_from((&reference - &base_lp).abs().max()).unwrap();
    assert!(diff < 1e-5, "reference vs base: {diff}");
    let moved = f64::try_from((&lp.logprobs - &base_lp).abs().max()).unwrap();
    assert!(
        moved > 1e-3,
        "the perturbed adapter should change the log-probs ({moved})"
    );
}
