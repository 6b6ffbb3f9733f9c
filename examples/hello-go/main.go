// A Go xcgi guest: prints a line and exits with code 5.
// Build static: CGO_ENABLED=0 go build -o hello-go .
// As PID 1, exiting makes the kernel panic with "Attempted to kill init!
// exitcode=0x00000500": that is how the VMM reads the exit code (5). The line is drained
// first (tcdrain, as examples/hello-c does): the serial driver sends it from its interrupt
// handler, and a panic right after the write could leave it in the tty's buffer, never sent.
package main

import (
	"fmt"
	"os"
	"syscall"
)

// tcsbrk is Linux's TCSBRK ioctl; with a non-zero argument it is tcdrain.
const tcsbrk = 0x5409

func main() {
	fmt.Println("Hello Go!")
	// Fails harmlessly when stdout is not a tty.
	syscall.Syscall(syscall.SYS_IOCTL, os.Stdout.Fd(), tcsbrk, 1)
	os.Exit(5)
}
