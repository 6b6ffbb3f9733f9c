module xcgi.example/hello-go

go 1.19
