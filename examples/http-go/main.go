// An xcgi HTTP-mode guest in Go: net/http on :80 (`mode = "http"` in `xcgi serve`).
// Build static: CGO_ENABLED=0 go build -o http-go .
package main

import (
	"fmt"
	"net"
	"net/http"
	"os"
)

func main() {
	// Listen first, then say so: a host reading the console knows the port is open.
	l, err := net.Listen("tcp", ":80")
	if err != nil {
		fmt.Fprintln(os.Stderr, "http-go:", err)
		os.Exit(1)
	}
	fmt.Println("http-go: listening on :80")
	err = http.Serve(l, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "Hello from Go in a fresh VM! %s\n", r.URL.Path)
	}))
	fmt.Fprintln(os.Stderr, "http-go:", err)
	os.Exit(1)
}
