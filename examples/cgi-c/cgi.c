/* A CGI/1.1 program in C (RFC 3875): the request arrives in the environment and on stdin,
 * the response goes to stdout. xcgi runs it in a fresh microVM per request (or as a child
 * process with --isolation process). PATH_INFO picks what it shows:
 *
 *   (none)      a greeting                     /env[/..] every variable, then the body
 *   /echo       the body back, byte for byte   /status   418 with a custom header
 *   /local      a local redirect to /env       /client   a redirect to another site
 *   /stream[?N] N lines (5), 300 ms apart      /big?N    N bytes of 'x'
 *   /persist    whether /tmp/xcgi-persist was already there (then creates it)
 *   /crash      abort()                        /garbage  output that is not a CGI response
 *   /sleep      sleeps for an hour             /alloc?N  allocates and touches N MiB
 *   /fresh      the wall clock (s), 16 bytes of getrandom and of AT_RANDOM, in hex
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static const char *env(const char *k) {
    const char *v = getenv(k);
    return v ? v : "";
}

static int cmp(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Copies CONTENT_LENGTH bytes (or to EOF) from stdin to stdout. */
static void copy_body(void) {
    long left = atol(env("CONTENT_LENGTH"));
    char buf[65536];
    while (left > 0) {
        ssize_t n = read(0, buf, left < (long)sizeof buf ? (size_t)left : sizeof buf);
        if (n <= 0) break;
        fwrite(buf, 1, (size_t)n, stdout);
        left -= n;
    }
}

int main(void) {
    const char *pi = env("PATH_INFO");
    if (!strncmp(pi, "/env", 4) && (pi[4] == 0 || pi[4] == '/')) {
        size_t n = 0;
        while (environ[n]) n++;
        char **sorted = malloc((n + 1) * sizeof *sorted);
        if (!sorted) return 1;
        memcpy(sorted, environ, (n + 1) * sizeof *sorted);
        qsort(sorted, n, sizeof *sorted, cmp);
        printf("Content-Type: text/plain\r\n\r\n");
        for (size_t i = 0; i < n; i++) printf("%s\n", sorted[i]);
        printf("body=[");
        fflush(stdout);
        copy_body();
        printf("]\n");
    } else if (!strcmp(pi, "/echo")) {
        printf("Content-Type: application/octet-stream\r\n\r\n");
        copy_body();
    } else if (!strcmp(pi, "/status")) {
        printf("Status: 418 I'm a teapot\r\nX-Handler: cgi-c\r\nContent-Type: text/plain\r\n\r\nshort and stout\n");
    } else if (!strcmp(pi, "/local")) {
        printf("Location: %s/env?via=local\r\n\r\n", env("SCRIPT_NAME"));
    } else if (!strcmp(pi, "/client")) {
        printf("Location: http://example.org/elsewhere\r\n\r\n");
    } else if (!strcmp(pi, "/stream")) {
        int n = atoi(env("QUERY_STRING"));
        if (n <= 0) n = 5;
        printf("Content-Type: text/plain\r\n\r\n");
        for (int i = 1; i <= n; i++) {
            printf("tick %d\n", i);
            fflush(stdout);
            if (i < n) usleep(300 * 1000);
        }
    } else if (!strcmp(pi, "/big")) {
        long n = atol(env("QUERY_STRING"));
        static char block[65536];
        memset(block, 'x', sizeof block);
        printf("Content-Type: application/octet-stream\r\n\r\n");
        while (n > 0) {
            size_t k = n < (long)sizeof block ? (size_t)n : sizeof block;
            fwrite(block, 1, k, stdout);
            n -= (long)k;
        }
    } else if (!strcmp(pi, "/persist")) {
        int before = access("/tmp/xcgi-persist", F_OK) == 0;
        FILE *f = fopen("/tmp/xcgi-persist", "w");
        if (f) fclose(f);
        printf("Content-Type: text/plain\r\n\r\nbefore=%s created=%s\n", before ? "yes" : "no", f ? "yes" : "no");
    } else if (!strcmp(pi, "/crash")) {
        fprintf(stderr, "cgi-c: crashing on purpose\n");
        abort();
    } else if (!strcmp(pi, "/garbage")) {
        printf("this is not a CGI response\n\n");
    } else if (!strcmp(pi, "/sleep")) {
        sleep(3600);
    } else if (!strcmp(pi, "/fresh")) {
        unsigned char r[16] = {0};
        const unsigned char *at = (const unsigned char *)getauxval(AT_RANDOM);
        if (getrandom(r, sizeof r, 0) != sizeof r) return 1;
        printf("Content-Type: text/plain\r\n\r\ntime=%ld random=", (long)time(NULL));
        for (int i = 0; i < 16; i++) printf("%02x", r[i]);
        printf(" at_random=");
        for (int i = 0; i < 16; i++) printf("%02x", at ? at[i] : 0);
        printf("\n");
    } else if (!strcmp(pi, "/alloc")) {
        long mib = atol(env("QUERY_STRING"));
        long done = 0;
        for (; done < mib; done++) {
            char *p = malloc(1 << 20);
            if (!p) break;
            memset(p, 1, 1 << 20); /* touched: the memory is really used */
        }
        printf("Content-Type: text/plain\r\n\r\ntouched %ld MiB\n", done);
    } else {
        printf("Content-Type: text/plain\r\n\r\nHello from CGI in a fresh VM! (%s %s)\n", env("REQUEST_METHOD"), env("SCRIPT_NAME"));
    }
    return 0;
}
