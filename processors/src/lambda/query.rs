//! The `query` function: the query API's router behind API Gateway's HTTP
//! API, through `lambda_http`.

use crate::api::{ApiState, app};

/// Serves the API until the runtime stops.
pub async fn run(state: ApiState) -> Result<(), lambda_http::Error> {
    lambda_http::run(app(state)).await
}
