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

use isdp_core::dial::ControlChannel;

use super::{CtlError, Format, api, output};
use isdp_cli::yaml::documents;

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
