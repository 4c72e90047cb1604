//! S3-compatible storage: client settings shared by the controller (verification) and the
//! gateway (presigning). Any S3 implementation works (AWS S3, MinIO, Garage, Ceph RGW, the
//! dev stack's embedded store); credentials come from flags or their `EDGEWISE_S3_*` twins,
//! which a Helm install fills from a Secret.

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};

/// How to reach the object store.
#[derive(Clone, Debug, clap::Args)]
pub struct S3Settings {
    /// S3 endpoint URL; empty for AWS S3 itself.
    #[arg(long = "s3-endpoint", env = "EDGEWISE_S3_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Region name (any value for most S3-compatible stores).
    #[arg(
        long = "s3-region",
        env = "EDGEWISE_S3_REGION",
        default_value = "us-east-1"
    )]
    pub region: String,
    /// Access key id.
    #[arg(
        long = "s3-access-key-id",
        env = "EDGEWISE_S3_ACCESS_KEY_ID",
        default_value = ""
    )]
    pub access_key_id: String,
    /// Secret access key.
    #[arg(
        long = "s3-secret-access-key",
        env = "EDGEWISE_S3_SECRET_ACCESS_KEY",
        default_value = "",
        hide_env_values = true
    )]
    pub secret_access_key: String,
    /// Use path-style URLs (`endpoint/bucket/key`), as most self-hosted stores need.
    #[arg(
        long = "s3-path-style",
        env = "EDGEWISE_S3_PATH_STYLE",
        default_value_t = true
    )]
    pub path_style: bool,
}

impl S3Settings {
    /// Settings for a store at `endpoint` with static credentials and path-style URLs.
    #[must_use]
    pub fn with_endpoint(
        endpoint: impl Into<String>,
        access_key_id: &str,
        secret_access_key: &str,
    ) -> Self {
        S3Settings {
            endpoint: Some(endpoint.into()),
            region: "us-east-1".into(),
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            path_style: true,
        }
    }

    /// A client for these settings. Building one performs no I/O.
    #[must_use]
    pub fn client(&self) -> aws_sdk_s3::Client {
        let credentials = Credentials::new(
            &self.access_key_id,
            &self.secret_access_key,
            None,
            None,
            "edgewise",
        );
        let mut config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(self.region.clone()))
            .credentials_provider(credentials)
            .force_path_style(self.path_style);
        if let Some(endpoint) = self.endpoint.as_deref().filter(|e| !e.is_empty()) {
            config = config.endpoint_url(endpoint);
        }
        aws_sdk_s3::Client::from_conf(config.build())
    }
}

/// An S3 failure in one sentence: the service's code and message with the HTTP status, or
/// why the store could not be reached, instead of the SDK's debug rendering.
pub fn describe<E>(
    e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> String
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    use aws_sdk_s3::error::SdkError;
    let causes = |e: &dyn std::error::Error| {
        let mut out = Vec::new();
        let mut cause = e.source();
        while let Some(c) = cause {
            out.push(c.to_string());
            cause = c.source();
        }
        out.join(": ")
    };
    match e {
        SdkError::ServiceError(s) => {
            let status = s.raw().status().as_u16();
            let err = s.err();
            match (err.code(), err.message()) {
                (Some(code), Some(msg)) => format!("{code} (HTTP {status}): {msg}"),
                (Some(code), None) => format!("{code} (HTTP {status})"),
                _ => format!("the store answered HTTP {status}"),
            }
        }
        SdkError::TimeoutError(_) => "the request to the store timed out".to_owned(),
        SdkError::DispatchFailure(_) => format!("cannot reach the store: {}", causes(e)),
        other => format!("{other}: {}", causes(other)),
    }
}
