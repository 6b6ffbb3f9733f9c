module xcgi.example/cgi-go

go 1.19
