//! Building SDK configuration for Kinesis and DynamoDB, against AWS or a
//! wire-compatible stand-in.

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_dynamodb::config::Credentials;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};

/// The region used when neither the environment nor a profile names one.
pub const DEFAULT_REGION: &str = "us-east-1";

/// Where the AWS clients connect, and as whom.
#[derive(Debug, Clone, Default)]
pub struct AwsConfig {
    /// A stand-in's (or a VPC endpoint's) URL instead of AWS's own endpoints.
    pub endpoint_url: Option<String>,
    /// Overrides the region from the environment.
    pub region: Option<String>,
    /// Fixed dummy credentials instead of the default provider chain: a
    /// stand-in such as moto accepts any, and the chain's instance-metadata
    /// probe would only add seconds of timeouts on a laptop.
    pub dummy_credentials: bool,
}

impl AwsConfig {
    /// A local stand-in server at `url` (moto in the tests).
    pub fn stand_in(url: impl Into<String>) -> Self {
        AwsConfig {
            endpoint_url: Some(url.into()),
            region: Some(DEFAULT_REGION.to_string()),
            dummy_credentials: true,
        }
    }

    /// Loads the SDK configuration. Reads the environment (and a profile file
    /// when there is one); no network call happens until the first request.
    pub async fn load(&self) -> SdkConfig {
        // ring instead of the SDK's default aws-lc: it builds faster and
        // cross-compiles for Lambda without a C toolchain per target. The
        // root certificates are read on the first TLS connection, not here,
        // which keeps a Lambda function's cold start short.
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http);
        if let Some(url) = &self.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        if let Some(region) = &self.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if self.dummy_credentials {
            loader = loader.credentials_provider(Credentials::new(
                "iotpipe-local",
                "iotpipe-local",
                None,
                None,
                "iotpipe-stand-in",
            ));
        }
        let config = loader.load().await;
        if config.region().is_some() {
            return config;
        }
        config
            .into_builder()
            .region(Region::new(DEFAULT_REGION))
            .build()
    }
}

/// Error codes that mean "not now" rather than "never", across Kinesis and
/// DynamoDB: throttling, capacity and the services' own internal failures.
const RETRYABLE_CODES: &[&str] = &[
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "Throttling",
    "ThrottledException",
    "RequestLimitExceeded",
    "LimitExceededException",
    "KMSThrottlingException",
    "InternalFailure",
    "InternalFailureException",
    "InternalServerError",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "TransactionInProgressException",
];

/// Whether a per-record or per-item error code is worth retrying.
pub fn is_retryable_code(code: &str) -> bool {
    RETRYABLE_CODES.contains(&code)
}

/// Whether a failed SDK call may succeed if made again: throttling, a 5xx,
/// a timeout or a connection failure. A request the service understood and
/// refused (missing resource, bad argument, access denied) will not.
pub fn is_retryable<E>(err: &aws_sdk_dynamodb::error::SdkError<E>) -> bool
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata,
{
    use aws_sdk_dynamodb::error::SdkError;
    match err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(ctx) => {
            let status = ctx.raw().status().as_u16();
            status >= 500 || status == 429 || ctx.err().code().is_some_and(is_retryable_code)
        }
        _ => false,
    }
}

/// An SDK error as one line with its cause chain, for logs and error values.
pub fn describe<E>(err: &aws_sdk_dynamodb::error::SdkError<E>) -> String
where
    E: std::error::Error + 'static,
{
    aws_sdk_dynamodb::error::DisplayErrorContext(err).to_string()
}
