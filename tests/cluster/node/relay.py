"""A TLS relay that puts a host-only HTTPS server (the fake Entra on 127.0.0.1, certificate for
`localhost`) where pods reach it: it listens on the node's gateway address with a certificate
for that address (signed by the CA the test broker image trusts) and forwards each connection
over TLS to the upstream, verifying it against the upstream's CA. Bytes pass unchanged.

    relay.py LISTEN_HOST LISTEN_PORT CERT KEY UPSTREAM_HOST UPSTREAM_PORT UPSTREAM_CA UPSTREAM_NAME
"""

import asyncio
import ssl
import sys


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        try:
            writer.close()
        except Exception:  # noqa: BLE001 - already closed by the other side
            pass


async def main(listen_host, listen_port, cert, key, up_host, up_port, up_ca, up_name):
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=up_ca)

    async def handle(reader, writer):
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(
                up_host, int(up_port), ssl=client_ctx, server_hostname=up_name), 10)
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as e:
            print(f"relay: upstream {up_host}:{up_port}: {e}", file=sys.stderr, flush=True)
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, listen_host, int(listen_port), ssl=server_ctx)
    print(f"relay: {listen_host}:{listen_port} -> {up_host}:{up_port}", file=sys.stderr,
          flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 9:
        sys.exit(__doc__)
    asyncio.run(main(*sys.argv[1:]))
