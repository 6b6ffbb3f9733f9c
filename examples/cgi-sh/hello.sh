#!/bin/sh
# A CGI script run by busybox sh from the guest image (its tree holds /bin/sh -> busybox).
echo "Content-Type: text/plain"
echo
echo "Hello from busybox sh! method=$REQUEST_METHOD query=$QUERY_STRING"
if [ -n "$CONTENT_LENGTH" ]; then
  echo "body=[$(head -c "$CONTENT_LENGTH")]"
fi
