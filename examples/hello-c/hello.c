/* The smallest xcgi guest: prints a line and exits with code 4.
 * Build static: gcc -static -O2 -o hello hello.c
 * As PID 1, returning from main makes the kernel panic with "Attempted to kill init!
 * exitcode=0x00000400": that is how the VMM reads the exit code (4). */
#include <stdio.h>

int main(void)
{
	puts("Hello!");
	fflush(stdout);
	return 4;
}
