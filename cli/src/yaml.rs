//! Policy documents as operators write them: YAML (JSON is YAML too),
//! several documents separated by `---`, turned into JSON values for the
//! control plane, which checks them field by field.
//!
//! A library module (not part of `commands`) so the fuzz harness
//! (`fuzz/`) drives exactly what `isdpctl policy apply` runs.

use serde_json::{Value, json};
use yaml_rust2::{Yaml, YamlLoader};

/// Every document in `text`, as JSON values.
pub fn documents(text: &str) -> Result<Vec<Value>, String> {
    let docs = YamlLoader::load_from_str(text).map_err(|e| format!("not valid YAML: {e}"))?;
    docs.iter()
        .filter(|d| !matches!(d, Yaml::Null))
        .enumerate()
        .map(|(i, d)| to_json(d).map_err(|e| format!("document {}: {e}", i + 1)))
        .collect()
}

fn to_json(y: &Yaml) -> Result<Value, String> {
    Ok(match y {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Integer(i) => json!(i),
        Yaml::Real(r) => {
            let f: f64 = r.parse().map_err(|_| format!("bad number {r:?}"))?;
            serde_json::Number::from_f64(f)
                .map(Value::Number)
                .ok_or_else(|| format!("number {r:?} has no JSON form"))?
        }
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Array(items) => Value::Array(items.iter().map(to_json).collect::<Result<_, _>>()?),
        Yaml::Hash(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                let key = match k {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    other => return Err(format!("mapping keys must be strings, got {other:?}")),
                };
                out.insert(key, to_json(v)?);
            }
            Value::Object(out)
        }
        Yaml::Alias(_) => return Err("YAML aliases are not supported".into()),
        Yaml::BadValue => return Err("unreadable value".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_documents_become_json() {
        let docs = documents(
            "service: payments\nretries:\n  attempts: 2\n  budget: { ratio: 0.2 }\n---\nservice: orders\nfault:\n  abort: { percent: 10, status: 503 }\n",
        )
        .unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0]["retries"]["attempts"], 2);
        assert_eq!(docs[0]["retries"]["budget"]["ratio"], 0.2);
        assert_eq!(docs[1]["fault"]["abort"]["status"], 503);
        // JSON is YAML too.
        let json = documents(r#"{"service": "payments", "timeouts": {"request": "1s"}}"#).unwrap();
        assert_eq!(json[0]["timeouts"]["request"], "1s");
    }

    #[test]
    fn broken_yaml_is_reported() {
        let err = documents("service: [unclosed\n").unwrap_err();
        assert!(err.starts_with("not valid YAML"), "{err}");
    }
}
