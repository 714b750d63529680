//! Property tests of QA extraction: it never panics, and a QA object embedded in noise is found.

use optimsyn_synth::{QaChecks, extract_qa};
use proptest::prelude::*;
use serde_json::json;

fn noise() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ {}\\[\\]\":,a-z0-9\\n]{0,60}",
        Just("```json\n".to_string()),
        Just("<think>{\"messages\": [1, 2]}</think>".to_string()),
        Just("{\"note\": \"draft\"} ".to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn never_panics(s in any::<String>()) {
        let _ = extract_qa(&s);
        let _ = QaChecks::default().check(&s);
    }

    #[test]
    fn never_panics_on_json_like_text(s in "[{}\\[\\]\":,ae \\\\/n0-9]{0,200}") {
        let _ = QaChecks::default().check(&s);
    }

    #[test]
    fn finds_a_qa_object_in_noise(
        before in noise(),
        after in noise(),
        q in "[^\\u{0}]{1,40}",
        a in "[^\\u{0}]{1,40}",
        reference_format in any::<bool>(),
    ) {
        prop_assume!(!after.contains("</think>"));
        let obj = if reference_format {
            json!({"messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
            ]})
        } else {
            json!({"question": q, "answer": a})
        };
        let text = format!("{before}{obj}{after}");
        let found = extract_qa(&text).map_err(|r| TestCaseError::fail(format!("{r} in {text:?}")))?;
        prop_assert_eq!(found.question, q);
        prop_assert_eq!(found.answer, a);
    }
}
