//! Request paths as authorization rules see them.
//!
//! A deny rule for `/admin` is worth something only if `//admin`,
//! `/./admin`, `/x/../admin` and `/%61dmin` are `/admin` too, because the
//! application will read them so. [`normalize`] puts a path in one
//! canonical form, the RFC 3986 (section 6.2.2) normalization Envoy's
//! `normalize_path` and `merge_slashes` apply (Istio's `MERGE_SLASHES`):
//!
//! - percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are
//!   decoded, other percent-encodings get upper-case hex (`%3b` -> `%3B`);
//! - characters a URI may not carry raw (`"`, `[`, `]`, `^`, `{`, `|`,
//!   `}`, non-ASCII) are percent-encoded, as the application will decode
//!   either form to the same text;
//! - `.` and `..` segments are removed, also once decoded from `%2e`
//!   (`..` never climbs above `/`), and repeated slashes are merged.
//!
//! Forms whose meaning depends on the application are refused rather than
//! guessed at: an encoded slash or backslash (`%2F`, `%5C`: one segment or
//! two? Envoy's `path_with_escaped_slashes_action: REJECT_REQUEST`), a raw
//! backslash (some servers read it as `/`), an encoded NUL (`%00`, refused
//! by Istio too), a malformed escape (`%zz`, `%4`), percent-encoded bytes
//! that are not UTF-8 (lenient decoders read the overlong `%C0%AF` as
//! `/`), and a dot segment with parameters (`/public/..;/admin`: Tomcat
//! drops `;/` parameters and then climbs).
//!
//! A path already canonical costs one pass and no allocation; so does one
//! whose canonical form is a prefix of it (`/admin/.` -> `/admin/`).
//!
//! [`Prefix`] is a rule's path prefix, compared with a canonical path on
//! whole segments (`/admin` covers `/admin` and `/admin/x`, never
//! `/administrator`), ignoring segment parameters (`/admin;jsessionid=1`
//! is `/admin`, as servers that strip them route it) and comparing
//! percent-encoded characters as the characters they encode (`/a%21` is
//! `/a!`).

use std::borrow::Cow;

/// Why a path was refused. The message is the detail of the 400 answer
/// and of a refused rule's field error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path must start with '/'")]
    NotAbsolute,
    #[error("'%' must be followed by two hex digits")]
    BadEscape,
    #[error("an encoded '/' or '\\' (%2F, %5C) is ambiguous and refused")]
    EncodedSlash,
    #[error("a '\\' is refused (some servers read it as '/')")]
    Backslash,
    #[error("an encoded NUL (%00) is refused")]
    EncodedNul,
    #[error("percent-encoded bytes must be UTF-8")]
    NotUtf8,
    #[error("a '.' or '..' segment with parameters (';') is refused")]
    DotWithParameters,
    #[error("spaces, control characters, '?' and '#' do not belong in a path")]
    BadChar,
}

impl PathError {
    /// A stable name, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            PathError::NotAbsolute => "not-absolute",
            PathError::BadEscape => "bad-escape",
            PathError::EncodedSlash => "encoded-slash",
            PathError::Backslash => "backslash",
            PathError::EncodedNul => "encoded-nul",
            PathError::NotUtf8 => "not-utf8",
            PathError::DotWithParameters => "dot-with-parameters",
            PathError::BadChar => "bad-char",
        }
    }
}

/// The canonical form of `path` (no query: the caller splits it off), or
/// why it has none. Borrowed when the canonical form is `path` or a
/// prefix of it.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let mut out = Out::new(bytes);
    out.push(b'/');
    let mut i = 1;
    loop {
        // One segment: bytes[i..] up to the next '/'.
        let start = out.len();
        while let Some(&b) = bytes.get(i).filter(|b| **b != b'/') {
            match b {
                b'%' => {
                    i = escape(bytes, i, &mut out)?;
                    continue;
                }
                b'\\' => return Err(PathError::Backslash),
                b'?' | b'#' => return Err(PathError::BadChar),
                b if b <= b' ' || b == 0x7f => return Err(PathError::BadChar),
                b if must_encode(b) => out.push_encoded(b),
                b => out.push(b),
            }
            i += 1;
        }
        let more = i < bytes.len();
        match Segment::of(&out.bytes()[start..]) {
            Segment::DotWithParameters => return Err(PathError::DotWithParameters),
            Segment::Dot => out.truncate(start),
            Segment::DotDot => {
                out.truncate(start);
                out.pop_segment();
            }
            // The slash before an empty segment already stands.
            Segment::Empty => {}
            Segment::Name if more => out.push(b'/'),
            Segment::Name => {}
        }
        if !more {
            break;
        }
        i += 1;
    }
    Ok(out.finish(path))
}

/// What a segment, once written, asks of the output.
enum Segment {
    Empty,
    Dot,
    DotDot,
    DotWithParameters,
    Name,
}

impl Segment {
    fn of(segment: &[u8]) -> Segment {
        let name = segment.split(|b| *b == b';').next().unwrap_or_default();
        match name {
            b"." | b".." if name.len() != segment.len() => Segment::DotWithParameters,
            b"." => Segment::Dot,
            b".." => Segment::DotDot,
            _ if segment.is_empty() => Segment::Empty,
            _ => Segment::Name,
        }
    }
}

/// Decodes the escape at `bytes[i]` (a '%') into `out`; returns where the
/// next character starts. A non-ASCII byte must start a UTF-8 sequence
/// whose other bytes are escaped right after it.
fn escape(bytes: &[u8], i: usize, out: &mut Out<'_>) -> Result<usize, PathError> {
    let v = decode_at(bytes, i).ok_or(PathError::BadEscape)?;
    match v {
        0 => Err(PathError::EncodedNul),
        b'/' | b'\\' => Err(PathError::EncodedSlash),
        v if is_unreserved(v) => {
            out.push(v);
            Ok(i + 3)
        }
        v if v.is_ascii() => {
            out.push_encoded(v);
            Ok(i + 3)
        }
        lead => {
            let n = match lead {
                0xc2..=0xdf => 2,
                0xe0..=0xef => 3,
                0xf0..=0xf4 => 4,
                _ => return Err(PathError::NotUtf8),
            };
            let mut char = [lead, 0, 0, 0];
            for (k, b) in char.iter_mut().enumerate().take(n).skip(1) {
                let at = i + 3 * k;
                if bytes.get(at) != Some(&b'%') {
                    return Err(PathError::NotUtf8);
                }
                *b = decode_at(bytes, at).ok_or(PathError::BadEscape)?;
            }
            // Rejects overlong forms, surrogates and bad continuations.
            std::str::from_utf8(&char[..n]).map_err(|_| PathError::NotUtf8)?;
            for b in &char[..n] {
                out.push_encoded(*b);
            }
            Ok(i + 3 * n)
        }
    }
}

/// The byte escaped at `bytes[i..i + 3]` (`%XX`, either hex case).
fn decode_at(bytes: &[u8], i: usize) -> Option<u8> {
    let hi = hex(*bytes.get(i + 1)?)?;
    let lo = hex(*bytes.get(i + 2)?)?;
    Some(hi << 4 | lo)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// RFC 3986 `unreserved`: the same character encoded or not.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Bytes a URI path may not carry raw that servers still accept (the
/// `http` crate lets these through for compatibility).
fn must_encode(b: u8) -> bool {
    !b.is_ascii()
        || matches!(
            b,
            b'"' | b'<' | b'>' | b'[' | b']' | b'^' | b'`' | b'{' | b'|' | b'}'
        )
}

/// The output of [`normalize`]: a length into the input for as long as it
/// is a prefix of the input, a buffer from the first byte that differs.
struct Out<'a> {
    input: &'a [u8],
    len: usize,
    owned: Option<Vec<u8>>,
}

impl<'a> Out<'a> {
    fn new(input: &'a [u8]) -> Self {
        Out {
            input,
            len: 0,
            owned: None,
        }
    }

    fn len(&self) -> usize {
        self.owned.as_ref().map_or(self.len, Vec::len)
    }

    fn bytes(&self) -> &[u8] {
        self.owned.as_deref().unwrap_or(&self.input[..self.len])
    }

    fn push(&mut self, b: u8) {
        match &mut self.owned {
            Some(v) => v.push(b),
            None if self.input.get(self.len) == Some(&b) => self.len += 1,
            None => {
                let mut v = Vec::with_capacity(self.input.len() + 8);
                v.extend_from_slice(&self.input[..self.len]);
                v.push(b);
                self.owned = Some(v);
            }
        }
    }

    fn push_encoded(&mut self, b: u8) {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        self.push(b'%');
        self.push(HEX[usize::from(b >> 4)]);
        self.push(HEX[usize::from(b & 0xf)]);
    }

    fn truncate(&mut self, n: usize) {
        match &mut self.owned {
            Some(v) => v.truncate(n),
            None => self.len = n,
        }
    }

    /// Removes the last segment (`..`); the output ends with '/' and stays
    /// at least "/".
    fn pop_segment(&mut self) {
        let bytes = self.bytes();
        if bytes.len() <= 1 {
            return;
        }
        let cut = bytes[..bytes.len() - 1]
            .iter()
            .rposition(|b| *b == b'/')
            .map_or(1, |p| p + 1);
        self.truncate(cut);
    }

    fn finish(self, input: &'a str) -> Cow<'a, str> {
        match self.owned {
            // Only ASCII is ever pushed, so both are whole characters.
            None => Cow::Borrowed(&input[..self.len]),
            Some(v) => Cow::Owned(String::from_utf8_lossy(&v).into_owned()),
        }
    }
}

// === impl Prefix ===

/// A rule's path prefix, ready to compare with canonical request paths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prefix {
    /// The prefix's segment names, percent-decoded.
    segments: Vec<Vec<u8>>,
    /// The prefix ends with '/': it covers what is under that directory,
    /// not the directory's own path.
    dir: bool,
}

impl Prefix {
    /// Compiles a prefix as rules write it (normalized first, so a prefix
    /// stored before the control plane required the canonical form means
    /// what it says).
    pub fn new(prefix: &str) -> Result<Prefix, PathError> {
        let canonical = normalize(prefix)?;
        let mut segments: Vec<Vec<u8>> = names(&canonical).map(decoded).collect();
        let dir = segments.last().is_some_and(Vec::is_empty);
        if dir {
            segments.pop();
        }
        Ok(Prefix { segments, dir })
    }

    /// Whether canonical `path` is this prefix or lies under it, on whole
    /// segments. `*` (`OPTIONS *`, the server as a whole) is under `/`
    /// only.
    pub fn matches(&self, path: &str) -> bool {
        if !path.starts_with('/') {
            return self.dir && self.segments.is_empty();
        }
        let mut names = names(path);
        for want in &self.segments {
            match names.next() {
                Some(name) if decodes_to(name, want) => {}
                _ => return false,
            }
        }
        !self.dir || names.next().is_some()
    }
}

/// The segment names of canonical `path` (after its leading '/'), each
/// without its parameters (from ';'). A segment that was parameters only
/// counts as merged away, unless it is the last (`/a/;x` ends in a
/// directory like `/a/`).
fn names(path: &str) -> impl Iterator<Item = &str> {
    let mut rest = path.strip_prefix('/');
    std::iter::from_fn(move || {
        loop {
            let (segment, tail) = match rest?.split_once('/') {
                Some((s, t)) => (s, Some(t)),
                None => (rest?, None),
            };
            rest = tail;
            let name = segment.split(';').next().unwrap_or_default();
            if name.is_empty() && tail.is_some() {
                continue;
            }
            return Some(name);
        }
    })
}

/// The bytes a percent-encoded name stands for.
fn decoded(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len());
    let bytes = name.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], decode_at(bytes, i)) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// `decoded(name) == want`, without allocating.
fn decodes_to(name: &str, want: &[u8]) -> bool {
    let bytes = name.as_bytes();
    let (mut i, mut k) = (0, 0);
    while i < bytes.len() {
        let (b, step) = match (bytes[i], decode_at(bytes, i)) {
            (b'%', Some(v)) => (v, 3),
            (b, _) => (b, 1),
        };
        if want.get(k) != Some(&b) {
            return false;
        }
        i += step;
        k += 1;
    }
    k == want.len()
}

#[cfg(test)]
mod tests;
