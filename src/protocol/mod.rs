//! Protocol adapters: translate the IMDS and App Service managed-identity wire formats to
//! broker calls and back. They know nothing of Entra.
//!
//! Rules that please every Azure SDK client (see README "Client compatibility"): every number
//! is a digit string, never empty; `error` + `error_description` on every error; a JSON body
//! even for "not found"; `Retry-After` only on 429/503, never on a 200.
//!
//! - [`imds`], [`app_service`]: each protocol's checks and error format;
//! - [`service`]: routing and the cached/waiting answer ([`TokenService`]);
//! - [`checks`]: what both protocols' checks share (the GET check, their result [`Lookup`]);
//! - [`query`]: query parameters and identity selectors;
//! - [`body`]: the token answer's body;
//! - [`refusals`]: rate-limited info lines for refused requests;
//! - [`error`]: the error model ([`ApiError`]).

pub mod app_service;
pub mod body;
pub mod checks;
pub mod error;
pub mod imds;
pub mod query;
pub mod refusals;
pub mod service;

pub use checks::Lookup;
pub use error::ApiError;
pub use query::{Query, SelectorParam};
pub use service::{Answer, TokenService};

pub const IMDS_TOKEN_PATH: &str = "/metadata/identity/oauth2/token";
pub const APP_SERVICE_TOKEN_PATH: &str = "/msi/token";
