//! `isdpctl policy`: traffic policies, written as YAML (or JSON) documents.
//!
//! YAML is turned into JSON here and sent as is: the control plane checks
//! the whole document and reports every problem (unknown fields included),
//! which a typed parse on this side would stop at the first of.

use std::path::PathBuf;

use clap::Subcommand;
use isdp_proto::v1::{
    DeletePolicyRequest, GetPolicyRequest, ListPoliciesRequest, PutPolicyRequest, StoredPolicy,
    policies_client::PoliciesClient,
};
use serde_json::{Value, json};
use yaml_rust2::{Yaml, YamlLoader};

use isdp_core::dial::ControlChannel;

use super::{CtlError, Format, api, output};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate and store the policy documents in FILE (YAML or JSON; `-`
    /// reads stdin; several YAML documents separated by `---`).
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Validate only; store nothing.
        #[arg(long)]
        dry_run: bool,
        /// Store only if the policy is at this version (0: must not exist),
        /// so concurrent edits cannot overwrite each other. One document only.
        #[arg(long)]
        expect_version: Option<u64>,
    },
    /// Print a service's policy and its version.
    Get { service: String },
    /// List every policy with its version.
    List,
    /// Delete a service's policy (its callers go back to their defaults).
    Delete {
        service: String,
        #[arg(long)]
        expect_version: Option<u64>,
    },
}

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

fn stored_json(p: &StoredPolicy) -> Value {
    let document: Value = serde_json::from_str(&p.document_json).unwrap_or(Value::Null);
    json!({
        "service": p.policy.as_ref().map(|x| x.service.clone()).unwrap_or_default(),
        "version": p.version,
        "document": document,
    })
}

pub async fn run(
    mut client: PoliciesClient<ControlChannel>,
    command: PolicyCommand,
    fmt: Format,
) -> Result<(), CtlError> {
    match command {
        PolicyCommand::Apply {
            file,
            dry_run,
            expect_version,
        } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
            } else {
                std::fs::read_to_string(&file)
            }
            .map_err(|e| CtlError::Usage(format!("reading {}: {e}", file.display())))?;
            let docs = documents(&text)
                .map_err(|e| CtlError::Usage(format!("{}: {e}", file.display())))?;
            if docs.is_empty() {
                return Err(CtlError::Usage(format!(
                    "{}: no policy documents",
                    file.display()
                )));
            }
            if expect_version.is_some() && docs.len() > 1 {
                return Err(CtlError::Usage(
                    "--expect-version applies to one document; the file has several".into(),
                ));
            }
            // Validate every document before storing any, so a bad one
            // late in the file does not leave the earlier ones applied.
            if !dry_run && docs.len() > 1 {
                for d in &docs {
                    client
                        .put(PutPolicyRequest {
                            document_json: d.to_string(),
                            expected_version: None,
                            dry_run: true,
                        })
                        .await
                        .map_err(api("policy apply"))?;
                }
            }
            let mut applied = Vec::new();
            for d in docs {
                let stored = client
                    .put(PutPolicyRequest {
                        document_json: d.to_string(),
                        expected_version: expect_version,
                        dry_run,
                    })
                    .await
                    .map_err(api("policy apply"))?
                    .into_inner()
                    .policy
                    .unwrap_or_default();
                applied.push(stored);
            }
            match fmt {
                Format::Json => {
                    output::print(Value::Array(applied.iter().map(stored_json).collect()))
                }
                Format::Table => {
                    for p in &applied {
                        let service = p.policy.as_ref().map_or("", |x| x.service.as_str());
                        if dry_run {
                            output::print(format!("policy {service}: valid (dry run, not stored)"));
                        } else {
                            output::print(format!("policy {service}: version {}", p.version));
                        }
                    }
                }
            }
        }
        PolicyCommand::Get { service } => {
            let p = client
                .get(GetPolicyRequest { service })
                .await
                .map_err(api("policy get"))?
                .into_inner()
                .policy
                .unwrap_or_default();
            match fmt {
                Format::Json => output::print(stored_json(&p)),
                Format::Table => {
                    let doc: Value = serde_json::from_str(&p.document_json).unwrap_or(Value::Null);
                    output::print(format!("# version {}", p.version));
                    output::print(serde_json::to_string_pretty(&doc).unwrap_or_default());
                }
            }
        }
        PolicyCommand::List => {
            let list = client
                .list(ListPoliciesRequest {})
                .await
                .map_err(api("policy list"))?
                .into_inner()
                .policies;
            match fmt {
                Format::Json => output::print(Value::Array(list.iter().map(stored_json).collect())),
                Format::Table => output::table(
                    &["SERVICE", "VERSION"],
                    list.iter()
                        .map(|p| {
                            vec![
                                p.policy
                                    .as_ref()
                                    .map(|x| x.service.clone())
                                    .unwrap_or_default(),
                                p.version.to_string(),
                            ]
                        })
                        .collect(),
                ),
            }
        }
        PolicyCommand::Delete {
            service,
            expect_version,
        } => {
            client
                .delete(DeletePolicyRequest {
                    service: service.clone(),
                    expected_version: expect_version,
                })
                .await
                .map_err(api("policy delete"))?;
            match fmt {
                Format::Json => output::print(json!({"deleted": service})),
                Format::Table => output::print(format!("deleted policy {service}")),
            }
        }
    }
    Ok(())
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
