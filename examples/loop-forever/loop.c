/* A guest that never exits: prints "looping", then spins, saying "alive <seconds>" once a
 * second (so a clone restored from a snapshot shows that its user space goes on). Used to
 * test VM deadlines and snapshots. Build static: gcc -static -O2 -o loop loop.c */
#include <stdio.h>
#include <time.h>

int main(void)
{
	puts("looping");
	fflush(stdout);
	time_t last = time(NULL);
	for (;;) {
		time_t now = time(NULL);
		if (now != last) {
			last = now;
			printf("alive %ld\n", (long)now);
			fflush(stdout);
		}
		/* An empty asm keeps the compiler from treating the loop as removable. */
		__asm__ volatile("" ::: "memory");
	}
}
