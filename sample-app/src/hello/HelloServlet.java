package hello;

import jakarta.servlet.ServletConfig;
import jakarta.servlet.ServletException;
import jakarta.servlet.annotation.WebServlet;
import jakarta.servlet.http.HttpServlet;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import java.io.IOException;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.util.Properties;

/**
 * The sample service: `/hello/` (a page), `/hello/version` (the version, as text) and
 * `/hello/health` (200 "ok" once started; 503 before). Faults are {@link FaultFilter}'s.
 */
@WebServlet(urlPatterns = {"", "/version", "/health"}, loadOnStartup = 1)
public final class HelloServlet extends HttpServlet {
    private String version;
    private long readyAt;

    @Override
    public void init(ServletConfig config) throws ServletException {
        super.init(config);
        Properties build = new Properties();
        try (InputStream in = config.getServletContext().getResourceAsStream("/WEB-INF/build.properties")) {
            if (in != null) {
                build.load(in);
            }
        } catch (IOException | RuntimeException e) {
            throw new ServletException("reading the build's properties", e);
        }
        version = build.getProperty("version", "unknown");
        // A slow starter (`build-sample-app --start-delay-ms`): healthy only after the delay.
        readyAt = System.currentTimeMillis() + Long.parseLong(build.getProperty("start_delay_ms", "0"));
    }

    @Override
    protected void doGet(HttpServletRequest request, HttpServletResponse response) throws IOException {
        String path = request.getServletPath();
        if (path.equals("/health")) {
            boolean ready = System.currentTimeMillis() >= readyAt;
            send(response, ready ? 200 : 503, "text/plain", ready ? "ok\n" : "starting\n");
            return;
        }
        if (path.equals("/version")) {
            send(response, 200, "text/plain", version + "\n");
        } else {
            send(response, 200, "text/html", "<!doctype html>\n<title>hello " + version + "</title>\n<h1>hello, version "
                    + version + "</h1>\n<p>Baked by Bakery onto Debian 12 + OpenJDK 17 + Tomcat 10.</p>\n");
        }
    }

    private static void send(HttpServletResponse response, int status, String type, String body) throws IOException {
        response.setStatus(status);
        response.setContentType(type);
        response.setCharacterEncoding("UTF-8");
        response.setHeader("Cache-Control", "no-store");
        response.getOutputStream().write(body.getBytes(StandardCharsets.UTF_8));
    }
}
