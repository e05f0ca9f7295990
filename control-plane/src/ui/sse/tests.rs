//! SSE framing as a browser parses it, and the stream bounds.

use super::*;

/// What an EventSource makes of a byte stream: (event, data) per
/// dispatched event, following the HTML standard's parsing rules.
fn parse(stream: &str) -> Vec<(String, String)> {
    let mut events = Vec::new();
    let (mut event, mut data): (String, Option<String>) = (String::new(), None);
    for line in stream.split('\n') {
        if line.is_empty() {
            if let Some(d) = data.take() {
                events.push((std::mem::take(&mut event), d));
            }
            event.clear();
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event = value.to_owned(),
            "data" => match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_owned()),
            },
            _ => {}
        }
    }
    events
}

#[test]
fn a_frame_round_trips_through_the_browsers_parser() {
    let json = r#"{"services":[{"name":"web"}]}"#;
    let f = frame("snapshot", json);
    assert_eq!(
        &f[..],
        format!("event: snapshot\ndata: {json}\n\n").as_bytes()
    );
    assert_eq!(
        parse(std::str::from_utf8(&f).unwrap()),
        vec![("snapshot".into(), json.into())]
    );
}

#[test]
fn line_breaks_in_data_become_data_lines_and_cannot_inject_fields() {
    let data = "a\nevent: evil\r\ndata: x\rb\n";
    let f = frame("snapshot", data);
    let text = std::str::from_utf8(&f).unwrap();
    // Every line the frame writes is a field of its own, none from the data.
    for line in text.split('\n').filter(|l| !l.is_empty()) {
        assert!(
            line.starts_with("event: snapshot") || line.starts_with("data: "),
            "{line:?}"
        );
    }
    let events = parse(text);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, "snapshot");
    assert_eq!(events[0].1, "a\nevent: evil\ndata: x\nb\n");
    // The event name is cut at a line break.
    let f = frame("snap\nevent: evil", "{}");
    assert_eq!(
        parse(std::str::from_utf8(&f).unwrap()),
        vec![("snap".into(), "{}".into())]
    );
}

#[test]
fn frames_concatenate_and_keepalives_are_ignored() {
    let mut stream = Vec::new();
    stream.extend_from_slice(&frame("snapshot", "1"));
    stream.extend_from_slice(&keepalive());
    stream.extend_from_slice(&frame("snapshot", "2"));
    let events = parse(std::str::from_utf8(&stream).unwrap());
    assert_eq!(
        events,
        vec![
            ("snapshot".into(), "1".into()),
            ("snapshot".into(), "2".into())
        ]
    );
}

#[test]
fn streams_are_bounded_in_total_and_per_session_and_given_back() {
    let streams = Streams::new(3, 2);
    let a1 = streams.acquire("a").unwrap();
    let _a2 = streams.acquire("a").unwrap();
    assert_eq!(
        streams.acquire("a").err(),
        Some(StreamRefused::Session { open: 2, max: 2 })
    );
    let _b1 = streams.acquire("b").unwrap();
    let err = streams.acquire("c").err().unwrap();
    assert_eq!(err, StreamRefused::Total { open: 3, max: 3 });
    assert!(err.to_string().contains("--ui-max-streams"), "{err}");
    drop(a1);
    assert_eq!(streams.open(), 2);
    let _c1 = streams.acquire("c").unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_quiet_stream_waits_for_a_change_the_refresh_or_the_keepalive() {
    let (tx, mut rx) = broadcast::channel::<u8>(4);
    let start = Instant::now();
    tx.send(1).unwrap();
    assert_eq!(wait(&mut rx, start).await, WaitOutcome::Look);
    assert_eq!(Instant::now(), start, "a change wakes it at once");
    assert_eq!(wait(&mut rx, start).await, WaitOutcome::Look);
    assert_eq!(Instant::now() - start, REFRESH);
    let long_ago = Instant::now() - KEEPALIVE;
    assert_eq!(wait(&mut rx, long_ago).await, WaitOutcome::Keepalive);
    drop(tx);
    assert_eq!(wait(&mut rx, Instant::now()).await, WaitOutcome::Closed);
}
