use rand::{Rng, SeedableRng, rngs::StdRng};

use super::*;

/// Input -> canonical form, for paths that have one.
const CANONICAL: &[(&str, &str)] = &[
    ("/", "/"),
    ("/admin", "/admin"),
    ("/admin/", "/admin/"),
    // Repeated slashes merge.
    ("//admin", "/admin"),
    ("//admin//x", "/admin/x"),
    ("///admin//x//", "/admin/x/"),
    ("//", "/"),
    // Dot segments go, also decoded and at the end.
    ("/./admin", "/admin"),
    ("/x/../admin", "/admin"),
    ("/x/y/../../admin", "/admin"),
    ("/admin/.", "/admin/"),
    ("/admin/..", "/"),
    ("/admin/./", "/admin/"),
    ("/./", "/"),
    ("/.", "/"),
    ("/..", "/"),
    ("/../../admin", "/admin"),
    ("/%2e%2e/admin", "/admin"),
    ("/%2E/admin", "/admin"),
    ("/.%2e/admin", "/admin"),
    ("/x/%2e%2E/admin", "/admin"),
    ("/x//../admin", "/admin"),
    // Names that only look like dots stay.
    ("/a/.../b", "/a/.../b"),
    ("/a/..b/.c", "/a/..b/.c"),
    ("/a/..%3B/b", "/a/..%3B/b"),
    // Unreserved characters are decoded, the rest upper-cased.
    ("/%61dmin", "/admin"),
    ("/ad%6Din", "/admin"),
    ("/ad%6din", "/admin"),
    ("/%41%5a%30%2D%5F%7e", "/AZ0-_~"),
    ("/a%3bb", "/a%3Bb"),
    ("/a%3Bb", "/a%3Bb"),
    ("/a%20b", "/a%20b"),
    ("/a%3f", "/a%3F"),
    // Decoded once: %25 stays, so %2541 is not %41.
    ("/a%25b", "/a%25b"),
    ("/a%2541", "/a%2541"),
    // UTF-8, escaped or raw, ends up escaped in upper case.
    ("/caf%c3%a9", "/caf%C3%A9"),
    ("/café", "/caf%C3%A9"),
    ("/%F0%9F%A6%80", "/%F0%9F%A6%80"),
    ("/\u{1f980}", "/%F0%9F%A6%80"),
    // Characters a URI may not carry raw are escaped.
    ("/a\"b{c}|d^[e]", "/a%22b%7Bc%7D%7Cd%5E%5Be%5D"),
    // Sub-delimiters, ':' and '@' are path characters as they are.
    ("/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,="),
    // Parameters are part of the path; a dot segment's own are refused.
    ("/admin;x", "/admin;x"),
    ("/a/b;c/../d", "/a/d"),
    ("/public;/../admin", "/admin"),
    ("/;x", "/;x"),
];

/// Inputs refused, and why.
const REFUSED: &[(&str, PathError)] = &[
    ("", PathError::NotAbsolute),
    ("admin", PathError::NotAbsolute),
    ("*", PathError::NotAbsolute),
    ("http://host/admin", PathError::NotAbsolute),
    ("/admin%2f", PathError::EncodedSlash),
    ("/admin%2Fx", PathError::EncodedSlash),
    ("/%2F%2Fadmin", PathError::EncodedSlash),
    ("/a%5cb", PathError::EncodedSlash),
    ("/a%5C", PathError::EncodedSlash),
    ("/a\\b", PathError::Backslash),
    ("\\admin", PathError::NotAbsolute),
    ("/%zz", PathError::BadEscape),
    ("/%4", PathError::BadEscape),
    ("/a%", PathError::BadEscape),
    ("/%g1", PathError::BadEscape),
    ("/%%41", PathError::BadEscape),
    ("/%00", PathError::EncodedNul),
    ("/admin%00.txt", PathError::EncodedNul),
    // Overlong '/', a lone lead, a lone continuation, bad continuations,
    // a surrogate, past U+10FFFF, and bytes never valid.
    ("/%C0%AF", PathError::NotUtf8),
    ("/%E0%80%AF", PathError::NotUtf8),
    ("/%C3", PathError::NotUtf8),
    ("/%C3x", PathError::NotUtf8),
    ("/%80", PathError::NotUtf8),
    ("/%C3%28", PathError::NotUtf8),
    ("/%ED%A0%80", PathError::NotUtf8),
    ("/%F4%90%80%80", PathError::NotUtf8),
    ("/%ff", PathError::NotUtf8),
    ("/%C3%zz", PathError::BadEscape),
    ("/public/..;/admin", PathError::DotWithParameters),
    ("/.;x/admin", PathError::DotWithParameters),
    ("/%2e%2e;/admin", PathError::DotWithParameters),
    ("/a/..;", PathError::DotWithParameters),
    ("/a b", PathError::BadChar),
    ("/a\tb", PathError::BadChar),
    ("/a\u{7f}", PathError::BadChar),
    ("/a?b", PathError::BadChar),
    ("/a#b", PathError::BadChar),
];

#[test]
fn paths_normalize_to_one_canonical_form() {
    for (input, want) in CANONICAL {
        assert_eq!(normalize(input).as_deref(), Ok(*want), "{input:?}");
    }
}

#[test]
fn ambiguous_and_malformed_paths_are_refused() {
    for (input, why) in REFUSED {
        assert_eq!(normalize(input), Err(*why), "{input:?}");
    }
}

/// The common case costs no allocation: a canonical path, or one whose
/// canonical form is a prefix of it, is borrowed.
#[test]
fn canonical_paths_are_borrowed() {
    for input in [
        "/",
        "/admin",
        "/api/v1/users/42",
        "/pkg.Service/Method",
        "/a%3Bb;x=1",
    ] {
        assert!(
            matches!(normalize(input), Ok(Cow::Borrowed(p)) if p == input),
            "{input:?}"
        );
    }
    assert!(matches!(
        normalize("/admin/."),
        Ok(Cow::Borrowed("/admin/"))
    ));
    assert!(matches!(normalize("/a/b/.."), Ok(Cow::Borrowed("/a/"))));
    assert!(matches!(normalize("//admin"), Ok(Cow::Owned(_))));
}

#[test]
fn long_paths_normalize_in_one_pass() {
    let long = "/a".repeat(30_000);
    assert!(matches!(normalize(&long), Ok(Cow::Borrowed(p)) if p.len() == long.len()));
    let climbing = format!("{}/admin", "/..".repeat(20_000));
    assert_eq!(normalize(&climbing).as_deref(), Ok("/admin"));
    let deep = format!("{}{}", "/x".repeat(20_000), "/..".repeat(20_000));
    assert_eq!(normalize(&deep).as_deref(), Ok("/"));
    let escaped = "/%61".repeat(20_000);
    assert_eq!(
        normalize(&escaped).as_deref(),
        Ok("/a".repeat(20_000).as_str())
    );
}

/// Random paths from the characters that matter: whatever normalizes is a
/// fixed point (borrowed, so the fast path agrees), has no dot or empty
/// segments, and is matched by itself as a prefix.
#[test]
fn normalizing_is_idempotent() {
    const PIECES: &[&str] = &[
        "/", "/", ".", "..", "%2e", "%2E", "%2f", "%5c", "%41", "%3b", "%3B", ";", "a", "A", "é",
        "%C3%A9", "%c3", "%", "~", "\\", "x=1", "%25",
    ];
    let mut rng = StdRng::seed_from_u64(7);
    let mut accepted = 0;
    for _ in 0..50_000 {
        let n = rng.random_range(0..12);
        let mut path = String::from("/");
        for _ in 0..n {
            path.push_str(PIECES[rng.random_range(0..PIECES.len())]);
        }
        let Ok(canonical) = normalize(&path) else {
            continue;
        };
        accepted += 1;
        let again = normalize(&canonical);
        assert!(
            matches!(&again, Ok(Cow::Borrowed(p)) if *p == canonical),
            "{path:?} -> {canonical:?} -> {again:?}"
        );
        assert!(!canonical.contains("//"), "{path:?} -> {canonical:?}");
        for segment in canonical.split('/') {
            assert!(
                segment != "." && segment != "..",
                "{path:?} -> {canonical:?}"
            );
        }
        assert!(
            Prefix::new(&canonical).unwrap().matches(&canonical),
            "{canonical:?}"
        );
    }
    assert!(accepted > 10_000, "only {accepted} random paths were valid");
}

fn prefix(p: &str) -> Prefix {
    Prefix::new(p).unwrap()
}

#[test]
fn prefixes_match_whole_segments() {
    let admin = prefix("/admin");
    for path in ["/admin", "/admin/", "/admin/x", "/admin/x/y"] {
        assert!(admin.matches(path), "{path}");
    }
    for path in [
        "/administrator",
        "/admi",
        "/",
        "/Admin",
        "/x/admin",
        "/admin-x/y",
        "*",
    ] {
        assert!(!admin.matches(path), "{path}");
    }
    let api = prefix("/api/v1");
    assert!(api.matches("/api/v1/users"));
    assert!(!api.matches("/api/v10"));
    assert!(!api.matches("/api"));
}

#[test]
fn a_prefix_ending_in_a_slash_covers_what_is_under_it() {
    let dir = prefix("/admin/");
    for path in ["/admin/", "/admin/x", "/admin/x/"] {
        assert!(dir.matches(path), "{path}");
    }
    for path in ["/admin", "/administrator/", "/"] {
        assert!(!dir.matches(path), "{path}");
    }
    let root = prefix("/");
    for path in ["/", "/x", "/admin/y", "*"] {
        assert!(root.matches(path), "{path}");
    }
}

#[test]
fn segment_parameters_are_ignored_when_matching() {
    let admin = prefix("/admin");
    for path in ["/admin;x", "/admin;jsessionid=1/users", "/;x/admin"] {
        assert!(admin.matches(path), "{path}");
    }
    assert!(prefix("/a/b").matches("/a/;x/b"));
    assert!(prefix("/admin/").matches("/admin/;x"));
    // An escaped ';' is a character of the name, not a parameter.
    assert!(!admin.matches("/admin%3Bx"));
}

#[test]
fn escaped_characters_match_what_they_encode() {
    for rule in ["/a!b", "/a%21b"] {
        let p = prefix(rule);
        for path in ["/a!b", "/a%21b", "/a!b/c"] {
            assert!(p.matches(path), "{rule} {path}");
        }
        assert!(!p.matches("/a%2521b"), "{rule}");
    }
    assert!(prefix("/caf%C3%A9").matches("/caf%C3%A9/menu"));
    assert!(prefix("/café").matches("/caf%C3%A9"));
}

#[test]
fn prefixes_are_normalized_like_paths() {
    assert_eq!(prefix("//admin/../x/"), prefix("/x/"));
    assert_eq!(prefix("/%61dmin"), prefix("/admin"));
    assert_eq!(Prefix::new("/a%2Fb"), Err(PathError::EncodedSlash));
}
