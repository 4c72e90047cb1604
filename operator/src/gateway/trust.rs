//! What the gateways trust, kept in the cluster so every replica sees the same and it
//! survives restarts: bootstrap tokens (Secrets labelled `edgewise.dev/bootstrap-token=true`)
//! and revocations (ConfigMaps labelled `edgewise.dev/revoked=device|token`, made by
//! `kubectl edgewise revoke` or by hand, undone by deleting them).

use std::collections::HashSet;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{ListParams, ObjectMeta};
use kube::runtime::watcher;
use kube::{Api, Client, Resource};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{BootstrapToken, Gateway};
use crate::crd::names::label;

/// What a revocation names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revoked {
    /// One device, by id: its credentials are refused and it cannot enrol again.
    Device,
    /// A bootstrap token, by its Secret's name: it enrols nobody, and every credential
    /// issued through it is refused.
    Token,
}

impl Revoked {
    fn label_value(self) -> &'static str {
        match self {
            Revoked::Device => "device",
            Revoked::Token => "token",
        }
    }
}

/// The ConfigMap that revokes `id`: named for it (so revoking twice is one object), the
/// id itself and the reason in its data.
#[must_use]
pub fn revocation(kind: Revoked, id: &str, reason: &str) -> ConfigMap {
    // Object names are DNS subdomains: device ids (`dev-<hex>`) and Secret names already are.
    let name = format!("revoked-{}-{id}", kind.label_value());
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name),
            labels: Some([(label::REVOKED.to_owned(), kind.label_value().to_owned())].into()),
            ..ObjectMeta::default()
        },
        data: Some(
            [
                ("id".to_owned(), id.to_owned()),
                ("reason".to_owned(), reason.to_owned()),
                ("revokedAt".to_owned(), jiff::Timestamp::now().to_string()),
            ]
            .into(),
        ),
        ..ConfigMap::default()
    }
}

/// The revoked device ids and token names in `maps`; one without an `id` is skipped.
#[must_use]
pub fn revocations_from(maps: &[ConfigMap]) -> (HashSet<String>, HashSet<String>) {
    let (mut devices, mut tokens) = (HashSet::new(), HashSet::new());
    for m in maps {
        let kind = m
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(label::REVOKED));
        let Some(id) = m.data.as_ref().and_then(|d| d.get("id")).map(|i| i.trim()) else {
            warn!(configmap = ?m.metadata.name, "revocation without an `id`; ignored");
            continue;
        };
        match kind.map(String::as_str) {
            Some("device") => devices.insert(id.to_owned()),
            Some("token") => tokens.insert(id.to_owned()),
            other => {
                warn!(configmap = ?m.metadata.name, kind = ?other, "revocation of an unknown kind (device or token); ignored");
                false
            }
        };
    }
    (devices, tokens)
}

/// Bootstrap tokens from their Secrets: `token`, and optionally `labels` (a YAML map) for
/// the devices it enrols, `expiresAt` (RFC 3339) and `maxDevices` (a count).
#[must_use]
pub fn tokens_from(secrets: &[Secret]) -> Vec<BootstrapToken> {
    secrets
        .iter()
        .filter_map(|s| {
            let data = s.data.as_ref()?;
            let token = String::from_utf8(data.get("token")?.0.clone()).ok()?;
            let labels = data
                .get("labels")
                .and_then(|l| serde_yaml_ng::from_slice(&l.0).ok())
                .unwrap_or_default();
            let name = s.metadata.name.clone().unwrap_or_default();
            // Unreadable, the token enrols nobody rather than forever.
            let expires_at = match data.get("expiresAt") {
                None => None,
                Some(v) => match std::str::from_utf8(&v.0).ok().and_then(|t| t.trim().parse().ok()) {
                    Some(at) => Some(at),
                    None => {
                        warn!(token = %name, "bootstrap token expiresAt is not an RFC 3339 time; it enrols nobody");
                        Some(jiff::Timestamp::UNIX_EPOCH)
                    }
                },
            };
            let max_devices = data.get("maxDevices").map(|v| {
                std::str::from_utf8(&v.0)
                    .ok()
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or_else(|| {
                        warn!(token = %name, "bootstrap token maxDevices is not a count; it enrols nobody");
                        0
                    })
            });
            Some(BootstrapToken {
                name,
                token: token.trim().to_owned(),
                labels,
                expires_at,
                max_devices,
            })
        })
        .collect()
}

/// Keeps `gateway`'s bootstrap tokens those of `namespace` until `shutdown`.
pub async fn follow_tokens(
    client: Client,
    namespace: String,
    gateway: Gateway,
    shutdown: CancellationToken,
) {
    follow::<Secret>(
        Api::namespaced(client, &namespace),
        format!("{}=true", label::BOOTSTRAP_TOKEN),
        move |secrets| gateway.auth().set_bootstrap_tokens(tokens_from(&secrets)),
        shutdown,
    )
    .await;
}

/// Keeps `gateway`'s revocations those of `namespace` until `shutdown`.
pub async fn follow_revocations(
    client: Client,
    namespace: String,
    gateway: Gateway,
    shutdown: CancellationToken,
) {
    follow::<ConfigMap>(
        Api::namespaced(client, &namespace),
        label::REVOKED.to_owned(),
        move |maps| {
            let (devices, tokens) = revocations_from(&maps);
            info!(
                devices = devices.len(),
                tokens = tokens.len(),
                "revocations"
            );
            gateway.auth().set_revocations(devices, tokens);
        },
        shutdown,
    )
    .await;
}

/// Hands every object matching `selector` to `apply` at start and after each change (they
/// are few: re-reading the set keeps it simple and exact, deletions included).
async fn follow<K>(
    api: Api<K>,
    selector: String,
    apply: impl Fn(Vec<K>),
    shutdown: CancellationToken,
) where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static,
{
    let kind = K::kind(&()).into_owned();
    let mut stream = Box::pin(watcher::watcher(
        api.clone(),
        watcher::Config::default().labels(&selector),
    ));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            e = stream.next() => match e {
                None => return,
                Some(Err(e)) => warn!(error = %e, %kind, %selector, "watching"),
                Some(Ok(_)) => match api.list(&ListParams::default().labels(&selector)).await {
                    Ok(list) => apply(list.items),
                    Err(e) => warn!(error = %e, %kind, %selector, "listing"),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;

    use super::*;

    fn secret(name: &str, data: &[(&str, &str)]) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn bootstrap_token_secrets_read_labels_expiry_and_cap_and_bad_ones_enrol_nobody() {
        let tokens = tokens_from(&[
            secret(
                "eu",
                &[
                    ("token", "0123456789abcdef\n"),
                    ("labels", "{region: eu}"),
                    ("expiresAt", "2027-06-30T00:00:00Z"),
                    ("maxDevices", "25\n"),
                ],
            ),
            secret("forever", &[("token", "fedcba9876543210")]),
            secret(
                "typo",
                &[
                    ("token", "x"),
                    ("expiresAt", "next tuesday"),
                    ("maxDevices", "lots"),
                ],
            ),
            secret("empty", &[("labels", "{a: b}")]),
        ]);
        let by_name: BTreeMap<&str, &BootstrapToken> =
            tokens.iter().map(|t| (t.name.as_str(), t)).collect();
        assert_eq!(by_name["eu"].token, "0123456789abcdef");
        assert_eq!(by_name["eu"].labels["region"], "eu");
        assert_eq!(
            by_name["eu"].expires_at,
            Some("2027-06-30T00:00:00Z".parse().expect("time"))
        );
        assert_eq!(by_name["forever"].expires_at, None);
        assert_eq!(by_name["eu"].max_devices, Some(25));
        assert_eq!(by_name["forever"].max_devices, None, "no cap");
        assert_eq!(
            by_name["typo"].max_devices,
            Some(0),
            "an unreadable cap admits nobody"
        );
        assert_eq!(
            by_name["typo"].expires_at,
            Some(jiff::Timestamp::UNIX_EPOCH),
            "an unreadable expiry is already past"
        );
        assert!(!by_name.contains_key("empty"), "no token key, no token");
    }

    #[test]
    fn revocations_read_back_by_kind_and_odd_ones_are_skipped() {
        let mut odd = revocation(Revoked::Device, "dev-x", "");
        odd.metadata.labels = Some([(label::REVOKED.to_owned(), "everything".to_owned())].into());
        let mut no_id = revocation(Revoked::Device, "dev-y", "");
        no_id.data = None;
        let (devices, tokens) = revocations_from(&[
            revocation(Revoked::Device, "dev-0123", "stolen"),
            revocation(Revoked::Token, "factory-eu", "leaked"),
            odd,
            no_id,
        ]);
        assert_eq!(devices, HashSet::from(["dev-0123".to_owned()]));
        assert_eq!(tokens, HashSet::from(["factory-eu".to_owned()]));
        let made = revocation(Revoked::Device, "dev-0123", "stolen");
        assert_eq!(
            made.metadata.name.as_deref(),
            Some("revoked-device-dev-0123")
        );
        assert_eq!(made.data.as_ref().expect("test data")["reason"], "stolen");
    }
}
