//! What the demo knows about its own world (`demo/kinds.json`, `demo/facts.jsonl`) and the method
//! does not: which fact kinds a rubric can ask for, the policy's exact distribution over them,
//! and reference datasets built straight from the facts. Only the demo's report uses this; the
//! pipeline never sees it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::Context;
use optimsyn_data_io::{ChatExample, ChatMessage, read_jsonl};
use optimsyn_rubric_policy::RubricPolicy;
use serde::Deserialize;

use optimsyn_pipeline::{Models, RunConfig, SeedPrompt};

/// One domain of `kinds.json`: the rubric forms the demo policy was taught and its fact kinds.
#[derive(Debug, Clone, Deserialize)]
pub struct DomainKinds {
    entity: String,
    prompt_forms: Vec<String>,
    response_forms: Vec<String>,
    alignment_forms: Vec<String>,
    technical_forms: Vec<String>,
    kinds: BTreeMap<String, KindSpec>,
}

#[derive(Debug, Clone, Deserialize)]
struct KindSpec {
    phrase: String,
    subtask: String,
}

/// `kinds.json`: domain → its kinds. (Its `validation_kinds` field is ignored: which kinds the
/// validation set asks is read from the validation set itself.)
pub type Catalogue = BTreeMap<String, DomainKinds>;

/// Reads `kinds.json` from the demo's assets.
pub fn catalogue(assets: &Path) -> anyhow::Result<Catalogue> {
    let path = assets.join("kinds.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a kind catalogue", path.display()))
}

/// The kinds each domain's rows of `val` ask about (by subtask name), `domain → kinds`.
pub fn asked_kinds(cat: &Catalogue, val: &[ChatExample]) -> BTreeMap<String, BTreeSet<String>> {
    let subtasks: BTreeSet<&str> = val.iter().filter_map(|e| e.subtask.as_deref()).collect();
    cat.iter()
        .map(|(d, spec)| {
            let kinds = spec
                .kinds
                .iter()
                .filter(|(_, k)| subtasks.contains(k.subtask.as_str()))
                .map(|(name, _)| name.clone())
                .collect();
            (d.clone(), kinds)
        })
        .collect()
}

/// The domain's kind names, in catalogue order.
pub fn kind_names(spec: &DomainKinds) -> Vec<String> {
    spec.kinds.keys().cloned().collect()
}

/// A rubric as the demo policy writes it (Python's `json.dumps` layout, keys in this order).
fn rubric_text(spec: &DomainKinds, kind: &KindSpec, form: &str) -> String {
    let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let prompt = form
        .replace("{phrase}", &kind.phrase)
        .replace("{entity}", &spec.entity);
    format!(
        "{{\"Prompt-related\": {}, \"Response-related\": {}, \"Prompt-Response alignment\": {}, \
         \"Technical/trainability aspects\": {}}}",
        q(&prompt),
        q(spec.response_forms.first().map_or("", String::as_str)),
        q(spec.alignment_forms.first().map_or("", String::as_str)),
        q(spec.technical_forms.first().map_or("", String::as_str)),
    )
}

/// The policy's distribution over fact kinds per domain, averaged over the training seed
/// documents: for each document, `p(kind) ∝ Σ_form p(rubric(kind, form) | prompt)` under the
/// policy's own log-probs (temperature 1), with the other rubric fields fixed (they come after the
/// question in the rubric and do not depend on the kind).
pub fn kind_distribution(
    policy: &RubricPolicy,
    m: &Models,
    cfg: &RunConfig,
    seeds: &[SeedPrompt],
    cat: &Catalogue,
) -> anyhow::Result<BTreeMap<String, BTreeMap<String, f64>>> {
    let mut sums: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    let mut docs: BTreeMap<String, usize> = BTreeMap::new();
    for s in seeds.iter().filter(|s| s.split == "train") {
        let domain = s.doc.domain.as_deref().unwrap_or(&cfg.data.domain);
        let Some(spec) = cat.get(domain) else {
            continue;
        };
        let prompt = m.policy_prompt.encode(
            &m.policy_tok,
            domain,
            &s.doc.text,
            Some(cfg.policy.enable_thinking),
        )?;
        let mut seqs = Vec::new();
        for kind in spec.kinds.values() {
            for form in &spec.prompt_forms {
                let mut ids = prompt.clone();
                ids.extend(
                    m.policy_tok
                        .encode_rendered(&rubric_text(spec, kind, form))?,
                );
                seqs.push(ids);
            }
        }
        let rows: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let lps = policy.model().sequence_logprobs(&rows, 1.0)?;
        // logprobs[i] is the log-prob of token i + 1: the completion starts at prompt.len() - 1.
        let per_seq: Vec<f64> = lps
            .iter()
            .map(|lp| lp[prompt.len() - 1..].iter().map(|&x| f64::from(x)).sum())
            .collect();
        let forms = spec.prompt_forms.len();
        let per_kind: Vec<f64> = per_seq.chunks(forms).map(log_sum_exp).collect();
        let norm = log_sum_exp(&per_kind);
        let dist = sums.entry(domain.to_string()).or_default();
        for (name, lp) in spec.kinds.keys().zip(&per_kind) {
            *dist.entry(name.clone()).or_default() += (lp - norm).exp();
        }
        *docs.entry(domain.to_string()).or_default() += 1;
    }
    for (d, dist) in &mut sums {
        let n = docs.get(d).copied().unwrap_or(1) as f64;
        dist.values_mut().for_each(|p| *p /= n);
    }
    Ok(sums)
}

fn log_sum_exp(xs: &[f64]) -> f64 {
    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    hi + xs.iter().map(|x| (x - hi).exp()).sum::<f64>().ln()
}

#[derive(Deserialize)]
struct Fact {
    id: String,
    domain: String,
    qa: BTreeMap<String, Qa>,
}

#[derive(Deserialize)]
struct Qa {
    question: String,
    answer: String,
}

/// A reference dataset of `n` QA pairs from `facts.jsonl` on the seed documents, cycling through
/// `kinds(domain)` document by document (the same documents, in the same order, as stage 3).
pub fn reference_dataset(
    assets: &Path,
    seeds: &[SeedPrompt],
    per_seed: usize,
    n: usize,
    kinds: impl Fn(&str) -> Vec<String>,
) -> anyhow::Result<Vec<ChatExample>> {
    let path = assets.join("facts.jsonl");
    let facts: BTreeMap<String, Fact> = read_jsonl::<Fact>(&path)
        .with_context(|| format!("{}", path.display()))?
        .into_iter()
        .map(|f| (f.id.clone(), f))
        .collect();
    let mut out = Vec::new();
    let mut turn: BTreeMap<String, usize> = BTreeMap::new();
    'docs: for g in 0..per_seed.max(1) {
        for s in seeds {
            if out.len() >= n {
                break 'docs;
            }
            let Some(f) = facts.get(&s.doc.id) else {
                continue;
            };
            let ks = kinds(&f.domain);
            if ks.is_empty() {
                continue;
            }
            let t = turn.entry(f.domain.clone()).or_default();
            let kind = &ks[*t % ks.len()];
            *t += 1;
            let qa = f.qa.get(kind).with_context(|| {
                format!("{}: {} has no `{kind}` question", path.display(), f.id)
            })?;
            out.push(ChatExample {
                id: Some(format!("{}/ref{g}", f.id)),
                messages: vec![
                    ChatMessage::user(qa.question.clone()),
                    ChatMessage::assistant(qa.answer.clone()),
                ],
                subtask: None,
            });
        }
    }
    Ok(out)
}
