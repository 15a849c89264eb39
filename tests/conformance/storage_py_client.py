"""The real Python Storage SDK (azure-storage-blob) with azure-identity's
ManagedIdentityCredential, which finds imds-broker through the App Service env
(IDENTITY_ENDPOINT + IDENTITY_HEADER). Creates a container, uploads SIZE random bytes,
downloads them and compares. Run in a clean environment by test_storage_azurite.py and
scripts/demo.

    python storage_py_client.py ACCOUNT_URL CONTAINER SIZE CA_FILE [CLIENT_ID]

Prints one JSON line: {ok, sdk, container, blob, bytes, sha256, downloaded_sha256, error}.
"""

import hashlib
import json
import os
import sys


def main():
    account_url, container, size, ca_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    client_id = sys.argv[5] if len(sys.argv) > 5 else None
    out = {"ok": False, "sdk": "python azure-storage-blob", "container": container, "blob": "payload.bin", "bytes": size}
    try:
        from azure.identity import ManagedIdentityCredential
        from azure.storage.blob import BlobServiceClient

        credential = ManagedIdentityCredential(client_id=client_id) if client_id else ManagedIdentityCredential()
        # connection_verify: the Storage endpoint's test CA (requests' verify=).
        service = BlobServiceClient(
            account_url, credential=credential, connection_verify=ca_file, max_block_size=4 * 1024 * 1024,
            max_single_put_size=4 * 1024 * 1024,
        )
        container_client = service.create_container(container)
        data = os.urandom(size)
        out["sha256"] = hashlib.sha256(data).hexdigest()
        blob = container_client.get_blob_client(out["blob"])
        # Over max_single_put_size: a multi-block upload (Put Block x2 + Put Block List).
        blob.upload_blob(data, max_concurrency=2)
        downloaded = blob.download_blob().readall()
        out["downloaded_bytes"] = len(downloaded)
        out["downloaded_sha256"] = hashlib.sha256(downloaded).hexdigest()
        out["content_length"] = blob.get_blob_properties().size
        out["ok"] = out["downloaded_sha256"] == out["sha256"]
    except Exception as e:  # the test reads the error from the JSON line
        out["error"] = f"{type(e).__name__}: {e}"[:2000]
        out["status"] = getattr(e, "status_code", None)
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
