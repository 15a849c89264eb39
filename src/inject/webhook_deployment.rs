//! `inject --webhook-deployment FILE`: the settings of a deployed (or about to be deployed)
//! webhook, read from its Deployment — `kubectl get deployment … -o yaml`, `helm template`,
//! `kustomize build` — so `inject` shows what that webhook would do without copying its flags.
//! The webhook container's `env` values and its flags after `webhook` become the defaults of
//! `inject`'s own flags: a flag or environment variable given to `inject` still wins.

use super::{parse, read_input, InjectArgs};
use crate::cli::{Cli, Command};
use anyhow::Context;
use clap::parser::ValueSource;
use clap::{Args, CommandFactory, Parser};
use serde_json::Value;
use std::ffi::OsString;
use std::path::Path;

/// `args` (the whole command line, program name first) parsed again with the settings of the
/// webhook Deployment in `file` as the defaults of the webhook flags.
pub fn apply(file: &Path, args: Vec<OsString>) -> anyhow::Result<InjectArgs> {
    let text = read_input(file)?;
    let json = text.trim_start().starts_with(['{', '[']);
    let docs = parse(&text, json)?;
    let shown = file.display();
    let container = docs
        .iter()
        .flat_map(|doc| match doc["kind"].as_str() {
            Some("List") => doc["items"].as_array().cloned().unwrap_or_default(),
            _ => vec![doc.clone()],
        })
        .find_map(|doc| webhook_container(&doc))
        .with_context(|| {
            format!(
                "{shown} holds no Deployment whose container runs `imds-broker webhook` (give \
                 the output of `kubectl -n NAMESPACE get deployment NAME -o yaml`, `helm \
                 template` or `kustomize build`)"
            )
        })?;
    let defaults = settings(&container, &shown.to_string())?;
    // The settings are added as flags, except where a flag or environment variable was given.
    let cmd = Cli::command();
    let given = cmd.clone().try_get_matches_from(&args)?;
    let given = given
        .subcommand_matches("inject")
        .context("not the inject command")?;
    let inject = cmd
        .find_subcommand("inject")
        .context("not the inject command")?;
    let mut args = args;
    for (id, values) in defaults {
        let explicit = matches!(
            given.value_source(&id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        let long = inject
            .get_arguments()
            .find(|a| a.get_id() == id.as_str())
            .and_then(|a| a.get_long());
        if let (false, Some(long)) = (explicit, long) {
            args.extend(
                values
                    .iter()
                    .map(|v| OsString::from(format!("--{long}={v}"))),
            );
        }
    }
    match Cli::try_parse_from(args)?.command {
        Command::Inject(args) => Ok(*args),
        _ => anyhow::bail!("not the inject command"),
    }
}

/// The container running `imds-broker webhook` in a Deployment (or any pod template).
fn webhook_container(doc: &Value) -> Option<Value> {
    let spec = doc
        .pointer("/spec/template/spec")
        .or_else(|| doc.get("spec"))?;
    spec["containers"]
        .as_array()?
        .iter()
        .find(|c| c["args"][0] == "webhook")
        .cloned()
}

/// Webhook flag ids and their values: from the container's flags after `webhook`, and from
/// its `env` (later entries win, as in Kubernetes).
fn settings(container: &Value, file: &str) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let webhook = crate::webhook::WebhookArgs::augment_args(clap::Command::new("webhook"));
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let mut set = |id: &str, values: Vec<String>| {
        out.retain(|(i, _)| i != id);
        out.push((id.to_owned(), values));
    };
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap_or_default();
        let Some(arg) = webhook
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == name))
        else {
            continue; // not a webhook setting (IMDS_BROKER_LOG_FORMAT, ...)
        };
        let Some(value) = var["value"].as_str() else {
            eprintln!(
                "{file}: {name} comes from valueFrom, which inject cannot resolve; pass it \
                 as --{} if it matters",
                arg.get_long().unwrap_or_default()
            );
            continue;
        };
        // As clap reads a list from the environment.
        let values = match arg.get_value_delimiter() {
            Some(d) => value.split(d).map(str::to_owned).collect(),
            None => vec![value.to_owned()],
        };
        set(arg.get_id().as_str(), values);
    }
    let flags: Vec<String> = container["args"]
        .as_array()
        .into_iter()
        .flatten()
        .skip(1)
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    if !flags.is_empty() {
        let matches = webhook
            .clone()
            .no_binary_name(true)
            .try_get_matches_from(&flags)
            .with_context(|| format!("{file}: the webhook's flags {flags:?}"))?;
        for arg in webhook.get_arguments() {
            let id = arg.get_id().as_str();
            if matches.value_source(id) != Some(ValueSource::CommandLine) {
                continue;
            }
            let values = matches
                .get_raw(id)
                .into_iter()
                .flatten()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            set(id, values);
        }
    }
    Ok(out)
}
