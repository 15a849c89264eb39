// The client half of scripts/demo: shows, step by step, a real Storage SDK writing a blob to
// Azurite (OAuth on) with a token from the emulated imds-broker. It finds the broker exactly as a
// pod with the sidecar does: IDENTITY_ENDPOINT + IDENTITY_HEADER (App Service protocol).
// The Storage endpoint's test CA comes in through NODE_EXTRA_CA_CERTS.
//
//   node demo.mjs ACCOUNT_URL BROKER_ADMIN_ADDR
// Prints what it does; never prints a token (it prints the decoded claims of one).
import { ManagedIdentityCredential } from "@azure/identity";
import { AnonymousCredential, BlobServiceClient } from "@azure/storage-blob";

const [accountUrl, adminAddr] = process.argv.slice(2);
const say = (n, text) => console.log(`\n[${n}] ${text}`);
const show = (text) => console.log(`    ${text}`);

say(1, `The broker's App Service endpoint (what the webhook injects): ${process.env.IDENTITY_ENDPOINT}`);
const url = `${process.env.IDENTITY_ENDPOINT}?api-version=2019-08-01&resource=${encodeURIComponent("https://storage.azure.com")}`;
const r = await fetch(url, { headers: { "X-IDENTITY-HEADER": process.env.IDENTITY_HEADER } });
const body = await r.json();
show(`HTTP ${r.status}; token_type ${body.token_type}, expires_on ${body.expires_on}, resource ${body.resource}`);
const claims = JSON.parse(Buffer.from(body.access_token.split(".")[1], "base64url"));
show("decoded claims (the token itself is not printed):");
for (const k of ["iss", "aud", "appid", "tid", "oid", "ver", "iat", "nbf", "exp", "imds_broker_emulated"]) {
  show(`  ${k.padEnd(21)}${JSON.stringify(claims[k])}`);
}
show("a v1 token as Entra issues for Storage: Azurite's --oauth basic checks issuer, audience, lifetime");

const container = `demo-${Date.now()}`;
say(2, `Without a token, Azurite refuses: create container ${container} anonymously`);
try {
  await new BlobServiceClient(accountUrl, new AnonymousCredential()).getContainerClient(container).create();
  show("UNEXPECTED: Azurite accepted an anonymous request");
  process.exit(1);
} catch (e) {
  show(`refused: HTTP ${e.statusCode} ${e.code}`);
}

say(3, "With @azure/identity ManagedIdentityCredential + @azure/storage-blob (no key, no secret)");
const service = new BlobServiceClient(accountUrl, new ManagedIdentityCredential());
const containerClient = service.getContainerClient(container);
await containerClient.create();
show(`created container ${container} at ${accountUrl}`);
const text = `hello from imds-broker's demo, written at ${new Date().toISOString()}\n`;
const blob = containerClient.getBlockBlobClient("hello.txt");
await blob.upload(text, Buffer.byteLength(text));
show(`uploaded hello.txt (${Buffer.byteLength(text)} bytes)`);
for await (const item of containerClient.listBlobsFlat()) {
  show(`listed: ${item.name}, ${item.properties.contentLength} bytes, etag ${item.properties.etag}`);
}
const back = (await blob.downloadToBuffer()).toString();
show(`downloaded: ${JSON.stringify(back)}`);
if (back !== text) {
  show("MISMATCH");
  process.exit(1);
}

say(4, "The broker's metrics: token requests it answered");
const metrics = await (await fetch(`http://${adminAddr}/metrics`)).text();
for (const line of metrics.split("\n").filter((l) => l.startsWith("imds_broker_http_requests_total"))) {
  show(line);
}
console.log("\nDone: the SDK's credential got its token from the broker, and Azurite accepted it.");
