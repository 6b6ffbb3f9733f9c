// A CGI program in Go: net/http/cgi turns the CGI environment and stdin into an
// http.Request and the ResponseWriter into a CGI response on stdout.
package main

import (
	"fmt"
	"io"
	"net/http"
	"net/http/cgi"
	"os"
)

func main() {
	err := cgi.Serve(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("Content-Type", "text/plain")
		w.Header().Set("X-Handler", "cgi-go")
		fmt.Fprintf(w, "Hello from Go CGI! %s %s query=%s body=[%s]\n", r.Method, r.URL.Path, r.URL.RawQuery, body)
	}))
	if err != nil {
		fmt.Fprintln(os.Stderr, "cgi-go:", err)
		os.Exit(1)
	}
}
