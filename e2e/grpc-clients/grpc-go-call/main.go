// Command grpc-go-call makes one unary gRPC call with grpc-go, for the plugin's socket tests
// (kubelet-plugin/tests/standard_clients.rs).
//
//	grpc-go-call path|target ADDRESS METHOD REQUEST_HEX
//
// "path" dials ADDRESS, a bare unix socket path, through a context dialer and no authority
// override: the way the kubelet's plugin watcher dials registration sockets, so grpc-go sends
// the percent-encoded path as :authority. "target" dials a grpc target such as unix:///x.sock
// with grpc-go's own resolver. Requests and responses are serialized protobuf in hex; the Rust
// test encodes and decodes them, so this client knows no message types. Prints the response's
// hex; on a failed call prints the status and exits 2.
package main

import (
	"context"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// rawCodec passes serialized messages through; named "proto" so the content type is the one
// every protobuf client sends.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error)      { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v any) error { *(v.(*[]byte)) = append([]byte(nil), data...); return nil }
func (rawCodec) Name() string                       { return "proto" }

func main() {
	if len(os.Args) != 5 || (os.Args[1] != "path" && os.Args[1] != "target") {
		fmt.Fprintln(os.Stderr, "usage: grpc-go-call path|target ADDRESS METHOD REQUEST_HEX")
		os.Exit(64)
	}
	mode, address, method := os.Args[1], os.Args[2], os.Args[3]
	request, err := hex.DecodeString(os.Args[4])
	if err != nil {
		fmt.Fprintf(os.Stderr, "REQUEST_HEX: %v\n", err)
		os.Exit(64)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	options := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	var conn *grpc.ClientConn
	if mode == "path" {
		options = append(options, grpc.WithBlock(), grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", addr)
		}))
		conn, err = grpc.DialContext(ctx, address, options...)
	} else {
		conn, err = grpc.NewClient(address, options...)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "dial %s: %v\n", address, err)
		os.Exit(2)
	}
	defer conn.Close()
	var response []byte
	if err := conn.Invoke(ctx, method, &request, &response, grpc.ForceCodec(rawCodec{})); err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", method, err)
		os.Exit(2)
	}
	fmt.Println(hex.EncodeToString(response))
}
