//! What to fix for the Entra (AADSTS) error codes a workload-identity exchange meets.

/// A one-line remedy for an AADSTS code, with the configured identity filled in.
pub fn hint(code: u32, client_id: &str, tenant_id: &str) -> String {
    match code {
        70021 => format!(
            "no federated identity credential on app {client_id} matches the service-account \
             token: its issuer must be the cluster's OIDC issuer URL, its subject \
             system:serviceaccount:<namespace>:<serviceaccount>, its audience \
             api://AzureADTokenExchange; a new credential takes a few minutes to propagate"
        ),
        700211 => format!(
            "the token's issuer matches no federated credential on app {client_id}: set the \
             credential's issuer to the cluster OIDC issuer URL (az aks show --query \
             oidcIssuerProfile.issuerUrl)"
        ),
        700212 => format!(
            "the token's audience matches no federated credential on app {client_id}: use \
             audience api://AzureADTokenExchange on both sides"
        ),
        700213 => format!(
            "the token's subject matches no federated credential on app {client_id}: create one \
             with subject system:serviceaccount:<namespace>:<serviceaccount> of this pod"
        ),
        700024 => "the service-account token is outside its valid time range: check the node \
                   clock and that the projected token is being rotated by kubelet"
            .to_owned(),
        700016 => format!(
            "application {client_id} was not found in tenant {tenant_id}: check AZURE_CLIENT_ID \
             (azure.workload.identity/client-id) and AZURE_TENANT_ID"
        ),
        90002 => format!(
            "tenant {tenant_id} was not found: check AZURE_TENANT_ID, and that \
             AZURE_AUTHORITY_HOST points at the tenant's cloud (public, China, US Government)"
        ),
        900023 | 90013 => format!(
            "tenant id {tenant_id:?} is malformed: set AZURE_TENANT_ID to the directory GUID"
        ),
        700027 | 50013 | 7000215 | 50027 => "Entra could not validate the service-account token: \
             the cluster's OIDC issuer must be public and serve its signing keys (JWKS), and the \
             token file must hold the projected token"
            .to_owned(),
        500011 => "the requested resource is not registered in the tenant: check the resource \
                   URI the client asked for"
            .to_owned(),
        70011 => {
            "the requested scope is invalid: check the resource URI the client asked for".to_owned()
        }
        7000112 | 7000222 | 700025 => format!(
            "app {client_id} is disabled or cannot use federated credentials: check it in Entra ID"
        ),
        50053 | 50196 => "Entra is throttling or blocking sign-ins for this app: wait and reduce \
                          request volume"
            .to_owned(),
        _ => format!(
            "see https://login.microsoftonline.com/error?code={code} for what AADSTS{code} means"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_codes_name_the_fix() {
        assert!(hint(70021, "cid", "tid").contains("system:serviceaccount"));
        assert!(hint(700016, "cid", "tid").contains("cid"));
        assert!(hint(90002, "cid", "tid").contains("AZURE_AUTHORITY_HOST"));
        assert!(hint(700024, "cid", "tid").contains("clock"));
        assert!(hint(12345, "cid", "tid").contains("code=12345"));
    }
}
