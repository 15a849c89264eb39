// A real Go azidentity client, run as a subprocess by the conformance suite
// (tests/conformance). The same file is in every tests/conformance/go/azidentity-vX.Y.Z module;
// only each module's go.mod/go.sum differ (the azidentity, azcore and MSAL Go versions a Velero
// release pins). tests/conformance/go/build.sh refuses to build if the copies differ.
//
// It builds the credential the way Velero's pkg/util/azure.NewCredential does:
//
//	azidentity.NewManagedIdentityCredential(&azidentity.ManagedIdentityCredentialOptions{
//	    ID: azidentity.ClientID(creds["AZURE_CLIENT_ID"]),
//	})
//
// and calls GetToken once per step, with a fresh credential per step (nothing cached between
// steps). The SDK picks the protocol from the environment exactly as in a pod: IDENTITY_ENDPOINT +
// IDENTITY_HEADER select App Service; otherwise IMDS at the hard-coded http://169.254.169.254
// (Go honours no IMDS override, so its IMDS path is tested in a network namespace).
//
// Usage: go-client mic|dac STEPS_JSON
//
//	mic: NewManagedIdentityCredential with the step's ID option (what Velero builds).
//	dac: NewDefaultAzureCredential(nil), whose managed-identity source first probes IMDS (a
//	     GET without Metadata, 1 s, no retry) when no App Service env is set; the step's ID
//	     options are ignored (no AZURE_CLIENT_ID is set either).
//
//	STEPS_JSON: [{"resource": "...", "scope": "...", "client_id": "...", "resource_id": "...",
//	              "object_id": "...", "timeout_secs": N}, ...]
//	  scope:       the scope asked for; default resource without trailing "/" + "/.default".
//	  client_id:   present (even "") -> ID: ClientID(value), Velero's option.
//	  resource_id: ID: ResourceID(value).   object_id: ID: ObjectID(value).
//	  none of them: no ID option (the default identity).
//	  timeout_secs: a deadline on GetToken's context (none by default).
//
// Prints ONE JSON line {"results": [...]}, each result: ok, phase ("constructor" or
// "get_token"), expires_on, token_len, claims (aud, iss, appid, oid, tid, sub, ver; never the
// token), error, error_type, status (of the response that failed the call, if any),
// attempts (GetToken calls: always 1, the SDK retries inside it), requests (HTTP requests the
// SDK sent, counted with net/http/httptrace on GetToken's context, so the SDK's own transport
// and retry policy are untouched), request_ms (when each request was written, ms after the
// credential was built), elapsed_ms, again_us (a second GetToken on the same credential: the
// SDK's cache).
package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http/httptrace"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"
)

type step struct {
	Resource    string  `json:"resource"`
	Scope       string  `json:"scope"`
	ClientID    *string `json:"client_id"`
	ResourceID  *string `json:"resource_id"`
	ObjectID    *string `json:"object_id"`
	TimeoutSecs float64 `json:"timeout_secs"`
}

type result struct {
	OK        bool              `json:"ok"`
	Phase     string            `json:"phase"`
	ExpiresOn int64             `json:"expires_on,omitempty"`
	TokenLen  int               `json:"token_len,omitempty"`
	Claims    map[string]any    `json:"claims,omitempty"`
	Error     string            `json:"error,omitempty"`
	ErrorType string            `json:"error_type,omitempty"`
	Status    int               `json:"status,omitempty"`
	Attempts  int               `json:"attempts"`
	Requests  int               `json:"requests"`
	RequestMs []int64           `json:"request_ms"`
	ElapsedMs int64             `json:"elapsed_ms"`
	AgainUs   int64             `json:"again_us,omitempty"`
	Options   map[string]string `json:"options"`
}

// Claims worth asserting on; the token itself is never printed.
var keptClaims = []string{"aud", "iss", "appid", "azp", "oid", "tid", "sub", "ver", "exp", "iat", "nbf"}

func scopeOf(s step) string {
	if s.Scope != "" {
		return s.Scope
	}
	return strings.TrimRight(s.Resource, "/") + "/.default"
}

func options(s step) (*azidentity.ManagedIdentityCredentialOptions, map[string]string) {
	o := &azidentity.ManagedIdentityCredentialOptions{}
	switch {
	case s.ResourceID != nil:
		o.ID = azidentity.ResourceID(*s.ResourceID)
		return o, map[string]string{"ID": "ResourceID", "value": *s.ResourceID}
	case s.ObjectID != nil:
		// objectID is in this module's objectid.go: azidentity has ObjectID from v1.8.0 only.
		o.ID = objectID(*s.ObjectID)
		return o, map[string]string{"ID": "ObjectID", "value": *s.ObjectID}
	case s.ClientID != nil:
		o.ID = azidentity.ClientID(*s.ClientID)
		return o, map[string]string{"ID": "ClientID", "value": *s.ClientID}
	}
	return o, map[string]string{"ID": "none"}
}

func claimsOf(token string) map[string]any {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return nil
	}
	raw, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return nil
	}
	all := map[string]any{}
	if json.Unmarshal(raw, &all) != nil {
		return nil
	}
	kept := map[string]any{}
	for _, k := range keptClaims {
		if v, ok := all[k]; ok {
			kept[k] = v
		}
	}
	return kept
}

// errorType names the azidentity error kind, as an operator would see it in Velero's log.
func errorType(err error) (string, int) {
	var afe *azidentity.AuthenticationFailedError
	if errors.As(err, &afe) {
		status := 0
		if afe.RawResponse != nil {
			status = afe.RawResponse.StatusCode
		}
		return "AuthenticationFailedError", status
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return "DeadlineExceeded", 0
	}
	// credentialUnavailableError is unexported; its type name is what tells it apart.
	return strings.TrimPrefix(fmt.Sprintf("%T", err), "*azidentity."), 0
}

func run(kind string, s step) result {
	opts, described := options(s)
	if kind == "dac" {
		described = map[string]string{"credential": "DefaultAzureCredential"}
	}
	started := time.Now()
	r := result{Options: described, Attempts: 1, RequestMs: []int64{}}
	var cred azcore.TokenCredential
	var err error
	switch {
	case kind == "dac":
		cred, err = azidentity.NewDefaultAzureCredential(nil)
	case s.ObjectID != nil && opts.ID == nil:
		err = errors.New("this azidentity version has no ObjectID option")
	default:
		cred, err = azidentity.NewManagedIdentityCredential(opts)
	}
	if err != nil {
		r.Phase = "constructor"
		r.Error = err.Error()
		r.ErrorType, r.Status = errorType(err)
		r.ElapsedMs = time.Since(started).Milliseconds()
		return r
	}
	r.Phase = "get_token"

	var mu sync.Mutex
	trace := &httptrace.ClientTrace{
		WroteRequest: func(httptrace.WroteRequestInfo) {
			mu.Lock()
			defer mu.Unlock()
			r.Requests++
			r.RequestMs = append(r.RequestMs, time.Since(started).Milliseconds())
		},
	}
	ctx := httptrace.WithClientTrace(context.Background(), trace)
	if s.TimeoutSecs > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(s.TimeoutSecs*float64(time.Second)))
		defer cancel()
	}
	tro := policy.TokenRequestOptions{Scopes: []string{scopeOf(s)}}
	tok, err := cred.GetToken(ctx, tro)
	mu.Lock()
	defer mu.Unlock()
	r.ElapsedMs = time.Since(started).Milliseconds()
	if err != nil {
		r.Error = err.Error()
		r.ErrorType, r.Status = errorType(err)
		return r
	}
	r.OK = true
	r.ExpiresOn = tok.ExpiresOn.Unix()
	r.TokenLen = len(tok.Token)
	r.Claims = claimsOf(tok.Token)
	again := time.Now()
	if tok2, err := cred.GetToken(context.Background(), tro); err == nil && tok2.Token == tok.Token {
		r.AgainUs = time.Since(again).Microseconds()
	}
	return r
}

func main() {
	if len(os.Args) != 3 || (os.Args[1] != "mic" && os.Args[1] != "dac") {
		fmt.Fprintln(os.Stderr, "usage: go-client mic|dac STEPS_JSON")
		os.Exit(2)
	}
	var steps []step
	if err := json.Unmarshal([]byte(os.Args[2]), &steps); err != nil {
		fmt.Fprintln(os.Stderr, "bad STEPS_JSON:", err)
		os.Exit(2)
	}
	results := make([]result, 0, len(steps))
	for _, s := range steps {
		results = append(results, run(os.Args[1], s))
	}
	out, _ := json.Marshal(map[string]any{"results": results})
	fmt.Println(string(out))
}
