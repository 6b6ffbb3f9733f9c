// A Go xcgi guest: prints a line and exits with code 5.
// Build static: CGO_ENABLED=0 go build -o hello-go .
// As PID 1, exiting makes the kernel panic with "Attempted to kill init!
// exitcode=0x00000500": that is how the VMM reads the exit code (5).
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Println("Hello Go!")
	os.Exit(5)
}
