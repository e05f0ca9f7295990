//! `isdpctl authz`: which services may call which.

use clap::Subcommand;
use isdp_proto::v1::{
    Action, AuthzRule, DeleteRuleRequest, GetDefaultRequest, ListRulesRequest, PutRuleRequest,
    SetDefaultRequest, authorization_client::AuthorizationClient,
};
use serde_json::json;

use isdp_core::dial::ControlChannel;

use super::{CtlError, Format, api, output};

#[derive(Debug, Subcommand)]
pub enum AuthzCommand {
    /// Allow services to call a destination (optionally only some methods
    /// and paths).
    Allow(RuleArgs),
    /// Deny services calling a destination; deny wins over allow.
    Deny(RuleArgs),
    /// Delete a rule.
    Delete {
        /// The destination service.
        #[arg(long = "to")]
        destination: String,
        name: String,
    },
    /// List rules, of one destination or all.
    List {
        #[arg(long = "to")]
        destination: Option<String>,
    },
    /// Print the mesh-wide default, or set it.
    Default {
        #[arg(value_enum)]
        action: Option<DefaultAction>,
    },
}

#[derive(Debug, clap::Args)]
pub struct RuleArgs {
    /// The destination service.
    #[arg(long = "to")]
    destination: String,
    /// A calling service, or "*" for any authenticated caller; repeatable.
    #[arg(long = "from", required = true)]
    sources: Vec<String>,
    /// Only these HTTP methods (repeatable); any when omitted.
    #[arg(long = "method")]
    methods: Vec<String>,
    /// Only paths under this prefix, on whole segments (/admin covers
    /// /admin/x, not /administrator); written in canonical form.
    #[arg(long)]
    path_prefix: Option<String>,
    /// The rule's name, unique per destination [default: ACTION-FROM].
    #[arg(long)]
    name: Option<String>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum DefaultAction {
    Allow,
    Deny,
}

fn action_name(action: i32) -> &'static str {
    match Action::try_from(action) {
        Ok(Action::Allow) => "allow",
        Ok(Action::Deny) => "deny",
        _ => "unspecified",
    }
}

fn rule_from(args: RuleArgs, action: Action) -> AuthzRule {
    let name = args.name.unwrap_or_else(|| {
        let who = match args.sources.first().map(String::as_str) {
            Some("*") | None => "any",
            Some(s) => s,
        };
        format!("{}-{who}", action_name(action as i32))
    });
    AuthzRule {
        name,
        destination: args.destination,
        sources: args.sources,
        action: action as i32,
        methods: args.methods,
        path_prefix: args.path_prefix.unwrap_or_default(),
    }
}

fn rule_json(r: &AuthzRule) -> serde_json::Value {
    json!({
        "name": r.name,
        "destination": r.destination,
        "sources": r.sources,
        "action": action_name(r.action),
        "methods": r.methods,
        "path_prefix": r.path_prefix,
    })
}

pub async fn run(
    mut client: AuthorizationClient<ControlChannel>,
    command: AuthzCommand,
    fmt: Format,
) -> Result<(), CtlError> {
    match command {
        AuthzCommand::Allow(args) => put(&mut client, rule_from(args, Action::Allow), fmt).await?,
        AuthzCommand::Deny(args) => put(&mut client, rule_from(args, Action::Deny), fmt).await?,
        AuthzCommand::Delete { destination, name } => {
            client
                .delete_rule(DeleteRuleRequest {
                    destination: destination.clone(),
                    name: name.clone(),
                })
                .await
                .map_err(api("authz delete"))?;
            match fmt {
                Format::Json => output::print(json!({"deleted": name, "destination": destination})),
                Format::Table => output::print(format!("deleted rule {name} of {destination}")),
            }
        }
        AuthzCommand::List { destination } => {
            let rules = client
                .list_rules(ListRulesRequest {
                    destination: destination.unwrap_or_default(),
                })
                .await
                .map_err(api("authz list"))?
                .into_inner()
                .rules;
            match fmt {
                Format::Json => output::print(serde_json::Value::Array(
                    rules.iter().map(rule_json).collect(),
                )),
                Format::Table => output::table(
                    &[
                        "DESTINATION",
                        "NAME",
                        "ACTION",
                        "FROM",
                        "METHODS",
                        "PATH PREFIX",
                    ],
                    rules
                        .iter()
                        .map(|r| {
                            vec![
                                r.destination.clone(),
                                r.name.clone(),
                                action_name(r.action).to_owned(),
                                r.sources.join(","),
                                if r.methods.is_empty() {
                                    "*".into()
                                } else {
                                    r.methods.join(",")
                                },
                                if r.path_prefix.is_empty() {
                                    "*".into()
                                } else {
                                    r.path_prefix.clone()
                                },
                            ]
                        })
                        .collect(),
                ),
            }
        }
        AuthzCommand::Default { action: None } => {
            let action = client
                .get_default(GetDefaultRequest {})
                .await
                .map_err(api("authz default"))?
                .into_inner()
                .action;
            match fmt {
                Format::Json => output::print(json!({"default": action_name(action)})),
                Format::Table => output::print(action_name(action)),
            }
        }
        AuthzCommand::Default {
            action: Some(action),
        } => {
            let action = match action {
                DefaultAction::Allow => Action::Allow,
                DefaultAction::Deny => Action::Deny,
            };
            client
                .set_default(SetDefaultRequest {
                    action: action as i32,
                })
                .await
                .map_err(api("authz default"))?;
            match fmt {
                Format::Json => output::print(json!({"default": action_name(action as i32)})),
                Format::Table => output::print(format!("default: {}", action_name(action as i32))),
            }
        }
    }
    Ok(())
}

async fn put(
    client: &mut AuthorizationClient<ControlChannel>,
    rule: AuthzRule,
    fmt: Format,
) -> Result<(), CtlError> {
    let stored = client
        .put_rule(PutRuleRequest { rule: Some(rule) })
        .await
        .map_err(api("authz put"))?
        .into_inner()
        .rule
        .unwrap_or_default();
    match fmt {
        Format::Json => output::print(rule_json(&stored)),
        Format::Table => output::print(format!(
            "{} rule {} of {}",
            action_name(stored.action),
            stored.name,
            stored.destination
        )),
    }
    Ok(())
}
