/* A guest that never exits: prints "looping", then spins. Used to test VM deadlines.
 * Build static: gcc -static -O2 -o loop loop.c */
#include <stdio.h>

int main(void)
{
	puts("looping");
	fflush(stdout);
	for (;;) {
		/* An empty asm keeps the compiler from treating the loop as removable. */
		__asm__ volatile("" ::: "memory");
	}
}
