module xcgi.example/http-go

go 1.19
