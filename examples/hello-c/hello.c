/* The smallest xcgi guest: prints a line and exits with code 4.
 * Build static: gcc -static -O2 -o hello hello.c
 * As PID 1, returning from main makes the kernel panic with "Attempted to kill init!
 * exitcode=0x00000400": that is how the VMM reads the exit code (4). The line is drained
 * first (tcdrain): the serial driver sends it from its interrupt handler, and a panic right
 * after the write would leave it in the tty's buffer, never sent (seen in the lab). */
#include <stdio.h>
#include <termios.h>
#include <unistd.h>

int main(void)
{
	puts("Hello!");
	fflush(stdout);
	tcdrain(STDOUT_FILENO); /* fails harmlessly when stdout is not a tty */
	return 4;
}
