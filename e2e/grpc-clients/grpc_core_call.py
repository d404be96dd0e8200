"""One unary gRPC call through grpc C-core (Python's grpcio), for the plugin's socket tests.

    grpc_core_call.py TARGET METHOD REQUEST_HEX

TARGET is a grpc target as users write it (`unix:///run/x.sock`, `unix:/run/x.sock`); no
authority is overridden, so C-core sends the one it derives from the target, as any grpcio
client would. The request and the response are serialized protobuf messages in hex: the Rust
test encodes and decodes them, so this client knows no message types. Prints the response's
hex on stdout; on a failed call prints the status code and details on stderr and exits 2.
"""

import sys

import grpc


def main() -> int:
    target, method, request_hex = sys.argv[1:4]
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(method)
        try:
            response = call(bytes.fromhex(request_hex), timeout=20)
        except grpc.RpcError as error:
            print(f"{error.code().name}: {error.details()}", file=sys.stderr)
            return 2
    print(response.hex())
    return 0


if __name__ == "__main__":
    sys.exit(main())
