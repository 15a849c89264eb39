// The real Node Storage SDK (@azure/storage-blob) with @azure/identity's
// ManagedIdentityCredential, which finds imds-broker through the App Service env
// (IDENTITY_ENDPOINT + IDENTITY_HEADER). Creates a container, uploads SIZE random bytes,
// downloads them and compares. The Storage endpoint's CA comes in through NODE_EXTRA_CA_CERTS.
//
//   node blob.mjs ACCOUNT_URL CONTAINER SIZE [CLIENT_ID]
// Prints one JSON line: {ok, sdk, container, blob, bytes, sha256, downloaded_sha256, error}.
import { createHash, randomBytes } from "node:crypto";
import { ManagedIdentityCredential } from "@azure/identity";
import { BlobServiceClient } from "@azure/storage-blob";

const [accountUrl, container, sizeArg, clientId] = process.argv.slice(2);
const size = Number(sizeArg);
const out = { ok: false, sdk: "node @azure/storage-blob", container, blob: "payload.bin", bytes: size };
try {
  const credential = clientId ? new ManagedIdentityCredential({ clientId }) : new ManagedIdentityCredential();
  const service = new BlobServiceClient(accountUrl, credential);
  const containerClient = service.getContainerClient(container);
  await containerClient.create();
  const data = randomBytes(size);
  out.sha256 = createHash("sha256").update(data).digest("hex");
  const blob = containerClient.getBlockBlobClient(out.blob);
  // 4 MiB blocks, so 8 MiB is a multi-block upload (Put Block x2 + Put Block List).
  await blob.uploadData(data, { blockSize: 4 * 1024 * 1024, concurrency: 2 });
  const downloaded = await blob.downloadToBuffer();
  out.downloaded_bytes = downloaded.length;
  out.downloaded_sha256 = createHash("sha256").update(downloaded).digest("hex");
  const props = await blob.getProperties();
  out.content_length = props.contentLength;
  out.ok = out.downloaded_sha256 === out.sha256;
} catch (e) {
  out.error = `${e.name}: ${e.message}`.slice(0, 2000);
  out.status = e.statusCode;
}
console.log(JSON.stringify(out));
process.exit(out.ok ? 0 : 1);
