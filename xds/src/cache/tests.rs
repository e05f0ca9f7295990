//! The cache on its own: typed resources, batches, and who is woken.

use std::collections::HashSet;

use bytes::Bytes;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};

use super::{Batch, Cache, Subscriptions};
use crate::WILDCARD;

/// A resource type of the tests' own, with its type URL from `Name`.
#[derive(Clone, PartialEq, Message)]
struct Thing {
    #[prost(string, tag = "1")]
    value: String,
}

impl Name for Thing {
    const NAME: &'static str = "Thing";
    const PACKAGE: &'static str = "test";
    fn type_url() -> String {
        "type.googleapis.com/test.Thing".into()
    }
}

const OTHER: &str = "type.googleapis.com/test.Other";

fn thing(value: &str) -> Thing {
    Thing {
        value: value.into(),
    }
}

fn taken(subs: &Subscriptions) -> Vec<(String, String)> {
    let mut all: Vec<_> = subs
        .wake
        .take()
        .into_iter()
        .flat_map(|(t, names)| names.into_iter().map(move |n| (t.to_string(), n)))
        .collect();
    all.sort();
    all
}

#[test]
fn typed_resources_are_stored_under_their_type_url() {
    let c = Cache::new([Thing::type_url()]);
    assert!(c.set("a", &thing("one")));
    assert!(!c.set("a", &thing("one")), "same content, same version");
    let stored = c
        .get(&Thing::type_url(), "a")
        .expect("stored by its type URL");
    let any = Any::decode(stored.any.clone()).unwrap();
    assert_eq!(any.type_url, Thing::type_url());
    assert_eq!(Thing::decode(any.value.as_slice()).unwrap(), thing("one"));
    assert_eq!(c.names::<Thing>(), ["a"]);
    assert!(c.remove::<Thing>("a"));
    assert!(!c.remove::<Thing>("a"), "nothing left to remove");
    assert!(c.names::<Thing>().is_empty());
}

/// Every change of a batch is marked on each stream watching it, at once;
/// what did not change marks nobody, and a type the cache does not serve
/// is skipped without losing the rest.
#[test]
fn a_batch_marks_each_watcher_with_everything_it_changed() {
    let c = Cache::new([Thing::type_url().as_str(), OTHER]);
    c.set("gone", &thing("g"));
    c.set("same", &thing("s"));
    let things = c.type_cache(&Thing::type_url()).unwrap();
    let other = c.type_cache(OTHER).unwrap();
    let mut named = Subscriptions::new(c.clone());
    named.add(&things, &"a".into());
    named.add(&other, &"x".into());
    named.add(&things, &"same".into());
    let mut wildcard = Subscriptions::new(c.clone());
    wildcard.add(&things, &WILDCARD.into());
    let mut unrelated = Subscriptions::new(c.clone());
    unrelated.add(&things, &"zzz".into());

    let mut batch = Batch::new();
    batch
        .set("a", &thing("a1"))
        .set("b", &thing("b1"))
        .set("same", &thing("s"))
        .remove::<Thing>("gone")
        .remove::<Thing>("never")
        .set_raw(OTHER, "x", Bytes::from_static(b"x1"))
        .set_raw("type.googleapis.com/not.Served", "n", Bytes::new());
    assert_eq!(batch.len(), 7);
    assert_eq!(c.apply(batch), 4, "a, b, gone and x changed");

    let t = Thing::type_url();
    let pair = |t: &str, n: &str| (t.to_owned(), n.to_owned());
    assert_eq!(taken(&named), [pair(OTHER, "x"), pair(&t, "a")]);
    assert_eq!(
        taken(&wildcard),
        [pair(&t, "a"), pair(&t, "b"), pair(&t, "gone")]
    );
    assert!(taken(&unrelated).is_empty());
    let held: HashSet<String> = things.names().into_iter().collect();
    assert_eq!(held, ["a", "b", "same"].map(String::from).into());
    assert!(c.get(OTHER, "x").is_some());

    // The same batch again changes nothing and marks nobody.
    let mut again = Batch::new();
    again.set("a", &thing("a1")).remove::<Thing>("gone");
    assert_eq!(c.apply(again), 0);
    assert!(taken(&named).is_empty() && taken(&wildcard).is_empty());

    // A closed stream is never woken again.
    drop(named);
    assert_eq!(things.watcher_count(), 2, "the wildcard and the unrelated");
    assert_eq!(other.watcher_count(), 0);
}
