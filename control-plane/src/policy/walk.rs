//! Reading a JSON document field by field while collecting every problem:
//! wrong types, values out of range and unknown fields are all reported,
//! each with its path (`retries.attempts: must be 0..10`), rather than
//! stopping at the first as a derived deserializer would.

use std::{collections::BTreeSet, time::Duration};

use serde_json::{Map, Value};

use crate::registry::validate::FieldError;

/// The problems found so far.
#[derive(Debug, Default)]
pub struct Problems(pub Vec<FieldError>);

impl Problems {
    pub fn push(&mut self, field: impl Into<String>, rule: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            rule: rule.into(),
        });
    }
}

/// Joins a parent path and a key: `retries` + `attempts`.
pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// One mapping being read. Keys read are remembered, so [`Obj::finish`]
/// can report the ones nobody asked for.
pub struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
    read: BTreeSet<&'static str>,
}

impl<'a> Obj<'a> {
    /// `value` as a mapping, or a problem at `path`.
    pub fn new(value: &'a Value, path: &str, p: &mut Problems) -> Option<Obj<'a>> {
        match value {
            Value::Object(map) => Some(Obj {
                map,
                path: path.to_owned(),
                read: BTreeSet::new(),
            }),
            other => {
                p.push(
                    if path.is_empty() { "document" } else { path },
                    format!("must be a mapping, got {}", kind(other)),
                );
                None
            }
        }
    }

    pub fn path(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// The raw value of `key`, if present and not null.
    pub fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.read.insert(key);
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub fn obj(&mut self, key: &'static str, p: &mut Problems) -> Option<Obj<'a>> {
        let path = self.path(key);
        self.get(key).and_then(|v| Obj::new(v, &path, p))
    }

    pub fn list(&mut self, key: &'static str, p: &mut Problems) -> Option<&'a Vec<Value>> {
        match self.get(key)? {
            Value::Array(items) => Some(items),
            other => {
                p.push(
                    self.path(key),
                    format!("must be a list, got {}", kind(other)),
                );
                None
            }
        }
    }

    pub fn string(&mut self, key: &'static str, p: &mut Problems) -> Option<String> {
        match self.get(key)? {
            Value::String(s) => Some(s.clone()),
            other => {
                p.push(
                    self.path(key),
                    format!("must be a string, got {}", kind(other)),
                );
                None
            }
        }
    }

    /// An integer in `lo..=hi`.
    pub fn int(&mut self, key: &'static str, lo: u64, hi: u64, p: &mut Problems) -> Option<u64> {
        let v = self.get(key)?;
        let path = self.path(key);
        int_value(v, &path, lo, hi, p)
    }

    /// A number in `lo..=hi`.
    pub fn number(&mut self, key: &'static str, lo: f64, hi: f64, p: &mut Problems) -> Option<f64> {
        match self.get(key)? {
            Value::Number(n) => match n.as_f64() {
                Some(x) if (lo..=hi).contains(&x) => Some(x),
                _ => {
                    p.push(self.path(key), format!("must be {lo}..{hi}, got {n}"));
                    None
                }
            },
            other => {
                p.push(
                    self.path(key),
                    format!("must be a number {lo}..{hi}, got {}", kind(other)),
                );
                None
            }
        }
    }

    /// A duration written as text (`250ms`, `1s`, `1m 30s`) in `lo..=hi`,
    /// in milliseconds.
    pub fn duration(
        &mut self,
        key: &'static str,
        lo: Duration,
        hi: Duration,
        p: &mut Problems,
    ) -> Option<u64> {
        let path = self.path(key);
        let range = format!(
            "{}..{}",
            humantime::format_duration(lo),
            humantime::format_duration(hi)
        );
        match self.get(key)? {
            Value::String(s) => match humantime::parse_duration(s.trim()) {
                Ok(d) if d >= lo && d <= hi => Some(d.as_millis() as u64),
                Ok(_) => {
                    p.push(path, format!("must be {range}, got {s:?}"));
                    None
                }
                Err(_) if s.trim_start().starts_with('-') => {
                    p.push(path, format!("must not be negative, got {s:?}"));
                    None
                }
                Err(e) => {
                    p.push(
                        path,
                        format!("must be a duration such as \"250ms\" or \"1s\" ({e}), got {s:?}"),
                    );
                    None
                }
            },
            Value::Number(n) if n.as_f64().is_some_and(|x| x < 0.0) => {
                p.push(path, format!("must not be negative, got {n}"));
                None
            }
            other => {
                p.push(
                    path,
                    format!(
                        "must be a duration with a unit, such as \"250ms\" or \"1s\", got {}",
                        kind(other)
                    ),
                );
                None
            }
        }
    }

    /// A mapping of strings to strings, at most `max` entries.
    pub fn string_map(
        &mut self,
        key: &'static str,
        max: usize,
        p: &mut Problems,
    ) -> Option<std::collections::BTreeMap<String, String>> {
        let path = self.path(key);
        let map = match self.get(key)? {
            Value::Object(m) => m,
            other => {
                p.push(path, format!("must be a mapping, got {}", kind(other)));
                return None;
            }
        };
        if map.len() > max {
            p.push(&path, format!("at most {max} entries, got {}", map.len()));
        }
        let mut out = std::collections::BTreeMap::new();
        for (k, v) in map {
            match v {
                Value::String(s) => {
                    out.insert(k.clone(), s.clone());
                }
                other => p.push(
                    join(&path, k),
                    format!("must be a string, got {}", kind(other)),
                ),
            }
        }
        Some(out)
    }

    /// Reports every key that was never read.
    pub fn finish(self, p: &mut Problems) {
        for key in self.map.keys() {
            if !self.read.contains(key.as_str()) {
                let known = self.read.iter().copied().collect::<Vec<_>>().join(", ");
                p.push(
                    join(&self.path, key),
                    format!("unknown field (known here: {known})"),
                );
            }
        }
    }
}

/// `v` as an integer in `lo..=hi`.
pub fn int_value(v: &Value, path: &str, lo: u64, hi: u64, p: &mut Problems) -> Option<u64> {
    match v {
        Value::Number(n) => match n.as_u64() {
            Some(x) if (lo..=hi).contains(&x) => Some(x),
            _ => {
                p.push(path, format!("must be an integer {lo}..{hi}, got {n}"));
                None
            }
        },
        other => {
            p.push(
                path,
                format!("must be an integer {lo}..{hi}, got {}", kind(other)),
            );
            None
        }
    }
}

/// `v` as a string.
pub fn string_value(v: &Value, path: &str, p: &mut Problems) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        other => {
            p.push(path, format!("must be a string, got {}", kind(other)));
            None
        }
    }
}
