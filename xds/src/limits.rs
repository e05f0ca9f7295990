//! What one stream may make the server hold, log or show.
//!
//! A client controls every byte of its requests; nothing it sends may grow
//! the server's memory, its log or an operator's view without bound. Names
//! are counted per stream and type: an exceeding request ends the stream
//! with RESOURCE_EXHAUSTED naming the type, the count and the limit (a
//! client subscribing to more names than any real one needs is broken or
//! hostile, and ending the stream is the only answer that frees what it
//! holds). Node ids are checked on the first request, and the text of a
//! NACK is cut before observers keep it.

use tonic::Status;

/// The limits of every stream of one server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most distinct names one stream may subscribe to per type URL,
    /// refused names included: state-of-the-world `resource_names`, delta
    /// `resource_names_subscribe` and `initial_resource_versions`.
    pub names_per_stream: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            names_per_stream: 4096,
        }
    }
}

impl Limits {
    /// RESOURCE_EXHAUSTED if a stream would hold `count` names of
    /// `type_url`.
    pub(crate) fn check_names(&self, type_url: &str, count: usize) -> Result<(), Status> {
        if count <= self.names_per_stream {
            return Ok(());
        }
        Err(Status::resource_exhausted(format!(
            "{type_url}: the stream would subscribe to {count} resource names, more than the limit of {} names per stream and type",
            self.names_per_stream
        )))
    }
}

/// Longest name a stream may subscribe to, in bytes: with
/// [`Limits::names_per_stream`] it bounds what a stream's subscriptions
/// hold. xDS names are identifiers (service names, `xdstp://` URLs), far
/// shorter.
pub const MAX_NAME_BYTES: usize = 1024;

/// What one subscribed name adds to the bytes a stream holds, beyond its
/// own bytes: a floor for the entries it takes in the stream's maps and
/// the cache's watcher table (which share one copy of the name), so that
/// many short names are not free. Rough by design: it is a unit of
/// account for [`name_cost`], not a measurement.
pub const NAME_OVERHEAD_BYTES: usize = 64;

/// What holding `name` costs a stream, in the bytes an application is
/// charged ([`crate::StreamAccess::charge`]): its length plus
/// [`NAME_OVERHEAD_BYTES`].
pub fn name_cost(name: &str) -> usize {
    name.len() + NAME_OVERHEAD_BYTES
}

/// INVALID_ARGUMENT if `name` of `type_url` is longer than
/// [`MAX_NAME_BYTES`].
pub(crate) fn check_name(type_url: &str, name: &str) -> Result<(), Status> {
    if name.len() <= MAX_NAME_BYTES {
        return Ok(());
    }
    Err(Status::invalid_argument(format!(
        "{type_url}: a resource name of {} bytes; names are at most {MAX_NAME_BYTES} bytes",
        name.len()
    )))
}

/// Longest node id the engine itself accepts, in bytes (the application
/// may accept less, [`crate::StreamAccess::node`]).
pub const MAX_NODE_ID_BYTES: usize = 1024;

/// Longest text the engine accepts in the node's other fields it reports
/// ([`crate::StreamInfo`]: user agent name and version, cluster, zone), in
/// bytes. They name a client library and a place ("gRPC Python",
/// "1.85.0", "us-east-1a"); node ids are longer because some systems
/// compose them from pod, namespace and address.
pub const MAX_NODE_FIELD_BYTES: usize = 256;

/// The checks every `node.id` passes whatever the application says: at
/// most [`MAX_NODE_ID_BYTES`] and no control characters, since it is shown
/// in logs, spans and tables.
pub(crate) fn check_node_id(id: &str) -> Result<(), Status> {
    check_node_text("node.id", id, MAX_NODE_ID_BYTES)
}

/// INVALID_ARGUMENT naming `field` if `value` is longer than `max` bytes
/// or holds control characters: every text of the node observers are told
/// ends up in tables and log lines.
pub(crate) fn check_node_text(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(Status::invalid_argument(format!(
            "{field}: {} bytes, at most {max}",
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "{field}: {value:?} holds control characters"
        )));
    }
    Ok(())
}

/// Most bytes of a NACK's `error_detail.message` observers are told (and
/// so keep and show); longer ones end with [`TRUNCATED`].
pub const MAX_NACK_MESSAGE_BYTES: usize = 1024;

/// What ends a NACK message cut at [`MAX_NACK_MESSAGE_BYTES`].
pub const TRUNCATED: &str = "… (truncated)";

/// `message` cut to at most [`MAX_NACK_MESSAGE_BYTES`] bytes (marker
/// included) on a character boundary.
pub(crate) fn nack_message(message: &str) -> String {
    if message.len() <= MAX_NACK_MESSAGE_BYTES {
        return message.to_owned();
    }
    let mut end = MAX_NACK_MESSAGE_BYTES - TRUNCATED.len();
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{TRUNCATED}", &message[..end])
}

/// A client's string for a message or a log line: Debug-quoted (control
/// characters escaped) and cut to its first 128 bytes, on a character
/// boundary, so that a request cannot make one line megabytes long.
pub(crate) fn quoted(s: &str) -> String {
    const MAX: usize = 128;
    if s.len() <= MAX {
        return format!("{s:?}");
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &s[..end], s.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_counted_against_the_limit() {
        let l = Limits {
            names_per_stream: 3,
        };
        assert!(l.check_names("t", 3).is_ok());
        let e = l.check_names("type.googleapis.com/x.Y", 4).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        for part in ["type.googleapis.com/x.Y", " 4 ", "limit of 3"] {
            assert!(e.message().contains(part), "{part}: {e}");
        }
        assert!(check_name("t", &"n".repeat(MAX_NAME_BYTES)).is_ok());
        let e = check_name("t", &"n".repeat(MAX_NAME_BYTES + 1)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("1024"), "{e}");
    }

    #[test]
    fn node_ids_are_bounded_and_printable() {
        assert!(check_node_id("web-1").is_ok());
        assert!(check_node_id("").is_ok(), "the application decides");
        for bad in ["web-1\nforged line", "a\x1b[31m", "tab\there", "nul\0"] {
            let e = check_node_id(bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().starts_with("node.id: "), "{e}");
            assert!(!e.message().contains('\n') && !e.message().contains('\x1b'));
        }
        let e = check_node_id(&"a".repeat(MAX_NODE_ID_BYTES + 1)).unwrap_err();
        assert!(e.message().contains("at most 1024"), "{e}");
    }

    #[test]
    fn quoted_strings_are_escaped_and_bounded() {
        assert_eq!(quoted("a\nb"), r#""a\nb""#);
        let long = format!("x\x1b{}", "é".repeat(1 << 20));
        let q = quoted(&long);
        assert!(q.len() < 200, "{q}");
        assert!(
            q.starts_with(r#""x\u{1b}é"#) && q.ends_with("… (2097154 bytes)"),
            "{q}"
        );
    }

    #[test]
    fn nack_messages_are_cut_on_a_char_boundary() {
        assert_eq!(nack_message("bad endpoint"), "bad endpoint");
        let exact = "x".repeat(MAX_NACK_MESSAGE_BYTES);
        assert_eq!(nack_message(&exact), exact);
        // Three-byte characters: no cut lands on a boundary by chance.
        for long in ["é".repeat(3000), "€".repeat(3000), "x".repeat(1 << 20)] {
            let cut = nack_message(&long);
            assert!(cut.len() <= MAX_NACK_MESSAGE_BYTES, "{}", cut.len());
            assert!(cut.len() > MAX_NACK_MESSAGE_BYTES - 8, "{}", cut.len());
            assert!(cut.ends_with(TRUNCATED));
            assert!(long.starts_with(cut.trim_end_matches(TRUNCATED)));
        }
    }
}
