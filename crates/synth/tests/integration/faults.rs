//! The HTTP backend against a scripted server that returns 429/500/400, stalls, closes the
//! connection or answers garbage.

use std::time::{Duration, Instant};

use optimsyn_synth::{Error, GenerationParams, Generator, OpenAiConfig, OpenAiGenerator};

use crate::common::{Act, MODEL, Scripted, completion_body, prompts};

fn client(url: &str, timeout_secs: f64, max_retries: u32) -> OpenAiGenerator {
    OpenAiGenerator::new(
        OpenAiConfig {
            base_url: url.to_string(),
            model: MODEL.into(),
            api_key_env: None,
            timeout_secs,
            concurrency: 2,
            max_retries,
            backoff_secs: 0.01,
            max_backoff_secs: 0.05,
            ..Default::default()
        },
        GenerationParams::greedy(8),
    )
    .expect("client")
}

fn one(g: &OpenAiGenerator) -> optimsyn_synth::Result<optimsyn_synth::Completion> {
    g.generate_all(&prompts(1)).pop().expect("one result")
}

#[test]
fn rate_limits_and_server_errors_are_retried() {
    let s = Scripted::start(vec![
        Act::Reply(
            429,
            "Retry-After: 0\r\n",
            r#"{"error": {"message": "slow down"}}"#.into(),
        ),
        Act::Reply(503, "", "overloaded".into()),
        Act::Reply(200, "", completion_body("fine")),
    ]);
    let c = one(&client(&s.url, 5.0, 3)).expect("succeeds on the third attempt");
    assert_eq!(c.text, "fine");
    assert_eq!(s.hits(), 3);
}

#[test]
fn a_persistent_500_gives_up_with_the_message() {
    let s = Scripted::start(vec![Act::Reply(
        500,
        "",
        r#"{"error": {"message": "boom", "type": "server_error"}}"#.into(),
    )]);
    let e = one(&client(&s.url, 5.0, 2)).unwrap_err();
    match &e {
        Error::Status {
            status: 500,
            attempts: 3,
            message,
            url,
        } => {
            assert_eq!(message, "boom");
            assert!(url.ends_with("/v1/chat/completions"), "{url}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.hits(), 3);
}

#[test]
fn a_400_is_not_retried() {
    let s = Scripted::start(vec![Act::Reply(
        400,
        "",
        r#"{"error": {"message": "bad field", "param": "x"}}"#.into(),
    )]);
    let e = one(&client(&s.url, 5.0, 4)).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Status {
                status: 400,
                attempts: 1,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(s.hits(), 1);
}

#[test]
fn a_slow_reply_hits_the_timeout() {
    let s = Scripted::start(vec![Act::Slow(
        Duration::from_secs(2),
        completion_body("too late"),
    )]);
    let t = Instant::now();
    let e = one(&client(&s.url, 0.3, 1)).unwrap_err();
    assert!(matches!(e, Error::Timeout { attempts: 2, .. }), "{e:?}");
    assert!(e.to_string().contains("no complete reply within"), "{e}");
    assert!(
        t.elapsed() < Duration::from_millis(1800),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(s.hits(), 2);
}

#[test]
fn malformed_replies_are_retried_then_reported() {
    for (act, want) in [
        (
            Act::Reply(200, "", "<html>not json</html>".into()),
            "not JSON",
        ),
        (
            Act::Reply(200, "", r#"{"object": "list"}"#.into()),
            "choices",
        ),
        (Act::Reply(200, "", r#"{"choices": []}"#.into()), "empty"),
    ] {
        let s = Scripted::start(vec![act]);
        let e = one(&client(&s.url, 5.0, 1)).unwrap_err();
        match &e {
            Error::MalformedReply {
                message, attempts, ..
            } => {
                assert!(message.contains(want), "{message}");
                assert_eq!(*attempts, 2);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.hits(), 2);
    }
}

#[test]
fn broken_connections_are_retried_then_reported() {
    for act in [Act::Close, Act::Garbage] {
        let s = Scripted::start(vec![act]);
        let e = one(&client(&s.url, 5.0, 2)).unwrap_err();
        assert!(matches!(e, Error::Transport { attempts: 3, .. }), "{e:?}");
        assert_eq!(s.hits(), 3);
    }
    // A dropped connection followed by a good reply recovers.
    let s = Scripted::start(vec![Act::Close, Act::Reply(200, "", completion_body("ok"))]);
    assert_eq!(one(&client(&s.url, 5.0, 2)).unwrap().text, "ok");
}

#[test]
fn nothing_listening_is_a_connection_error_naming_the_url() {
    // Bind and drop to find a port with nothing on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/v1");
    let e = one(&client(&url, 2.0, 1)).unwrap_err();
    assert!(matches!(e, Error::Transport { attempts: 2, .. }), "{e:?}");
    assert!(e.to_string().contains(&url), "{e}");
}
