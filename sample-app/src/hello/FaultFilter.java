package hello;

import jakarta.servlet.FilterChain;
import jakarta.servlet.FilterConfig;
import jakarta.servlet.ServletException;
import jakarta.servlet.annotation.WebFilter;
import jakarta.servlet.http.HttpFilter;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import java.io.IOException;
import java.nio.charset.StandardCharsets;

/**
 * Every request to the app but its health check (static files too) goes through the fault
 * switch ({@link Faults}): delayed, and failed with 500 as often as it says.
 */
@WebFilter("/*")
public final class FaultFilter extends HttpFilter {
    private Faults faults;

    @Override
    public void init(FilterConfig config) throws ServletException {
        super.init(config);
        try {
            faults = new Faults(config.getServletContext().getResourceAsStream("/WEB-INF/fault.properties"));
        } catch (IOException | RuntimeException e) {
            throw new ServletException("reading the built-in faults", e);
        }
    }

    @Override
    protected void doFilter(HttpServletRequest request, HttpServletResponse response, FilterChain chain)
            throws IOException, ServletException {
        if (request.getServletPath().equals("/health")) {
            chain.doFilter(request, response);
            return;
        }
        boolean fail;
        try {
            fail = faults.apply();
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            fail = true;
        }
        if (fail) {
            response.setStatus(500);
            response.setContentType("text/plain");
            response.getOutputStream().write("injected failure\n".getBytes(StandardCharsets.UTF_8));
            return;
        }
        chain.doFilter(request, response);
    }
}
